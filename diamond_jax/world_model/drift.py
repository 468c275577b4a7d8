"""Drift detection and recovery in long rollouts of a world model (Gijsen & Ritter, "Distribution recovery in
compact diffusion world models via conditioned frame interpolation"; README "Long rollouts").

Detectors, computed on the denoiser's frames (in [-1, 1]) as they are drawn:
- `change`: the MSE between consecutive frames (the paper's). Its mean over the last `stuck_window` frames
  below `stuck_threshold` says the rollout is stuck; one step above `jump_threshold` says it teleported.
- `novelty`: the distance of a frame to its nearest neighbour in a buffer of dataset frames, the MSE between
  frames average-pooled by `pool` (tolerant to a small object moving a few pixels). Its mean over the last
  `novelty_window` frames above `novelty_threshold` says the frames have left the dataset (morphing, blur,
  noise).
Recovery (a denoiser trained with interpolation, models/interpolation.py): when a detector fires, the buffer
frame nearest the current one becomes the target of an m-step interpolation (buckets 0..m-1, the target
blended as in training), then autoregression resumes; detection waits until its windows hold only frames drawn
after the recovery.

Everything here is a pure function of arrays; `rollout` is one `lax.scan`.
"""

import dataclasses
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.data.recorded import RecordedDataset
from diamond_jax.models.interpolation import seen_target
from diamond_jax.world_model.model import Frames, WorldModel, Variables, advance


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """Detector thresholds and recovery; the defaults are calibrated on Breakout at 64x64 (docs/world_models.md):
    they sit beyond every window of the real test episodes."""

    stuck_window: int = 48  # frames whose mean consecutive-frame MSE says "stuck" (Breakout idles up to 42)
    stuck_threshold: float = 1e-5  # ...stuck below this mean MSE (frames in [-1, 1])
    jump_threshold: float = 0.02  # one consecutive-frame MSE above this: a teleport (real Breakout: < 0.004)
    novelty_window: int = 8  # frames whose mean nearest-neighbour distance says "off the dataset"
    novelty_threshold: float = 2e-3  # ...off the dataset above this mean distance (real test frames: < 8e-4)
    pool: int = 4  # the nearest-neighbour distance compares frames average-pooled by this factor
    buffer_size: int = 512  # dataset frames in the buffer, drawn uniformly from the training episodes
    recovery: bool = False  # on detection, interpolate toward the nearest buffer frame (needs interpolation)

    def __post_init__(self):
        for name in ("stuck_window", "novelty_window", "pool", "buffer_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"drift {name}={value!r}: use an integer >= 1")
        for name in ("stuck_threshold", "jump_threshold", "novelty_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"drift {name}={getattr(self, name)!r}: use a number >= 0")


def sample_buffer(dataset: RecordedDataset, model: WorldModel, size: int, seed: int,
                  split: str = "train") -> jax.Array:
    """`size` frames drawn uniformly (without replacement where there are enough) from the frames of the split's
    episodes, at the denoiser's resolution in [-1, 1]: [size, h, w, 3]."""
    ids, lengths = dataset.episode_ids(split), dataset.lengths(split)
    total = int(np.sum(lengths))
    if not total:
        raise ValueError(f"{dataset.path} has no {split} frames for a buffer of dataset frames")
    rng = np.random.default_rng([seed, 7])
    picks = np.sort(rng.choice(total, size, replace=size > total))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    episode = np.searchsorted(starts, picks, side="right") - 1
    frames = np.stack([dataset.episode(ids[e]).obs[p - starts[e]] for e, p in zip(episode, picks)])
    return model.low_res(jnp.asarray(frames))


def pool_frames(x: jax.Array, pool: int) -> jax.Array:
    """[..., h, w, c] -> [..., h / pool, w / pool, c], the mean of each pool x pool block (sizes cropped to a
    multiple of pool)."""
    *lead, h, w, c = x.shape
    h, w = h - h % pool, w - w % pool
    x = x[..., :h, :w, :].reshape(*lead, h // pool, pool, w // pool, pool, c)
    return x.mean(axis=(-4, -2))


def frame_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """MSE per frame of [..., h, w, c] frames."""
    return jnp.mean((a - b) ** 2, axis=(-3, -2, -1))


def nearest(frames: jax.Array, pooled_buffer: jax.Array, pool: int):
    """(distance [b], index [b]): each frame's nearest buffer frame, by the MSE of pooled frames. pooled_buffer:
    pool_frames of the buffer, [B, h', w', c]."""
    x = pool_frames(frames, pool).reshape(frames.shape[0], -1)
    y = pooled_buffer.reshape(pooled_buffer.shape[0], -1)
    # |x - y|^2 expanded: one matrix product instead of a [b, B, d] difference.
    d = (jnp.sum(x ** 2, -1)[:, None] - 2 * x @ y.T + jnp.sum(y ** 2, -1)[None]) / x.shape[1]
    d = jnp.maximum(d, 0.0)
    return jnp.min(d, axis=1), jnp.argmin(d, axis=1)


class Scores(NamedTuple):
    """Per step of a rollout, [b, T] each."""

    change: jax.Array  # MSE between the drawn frame and the one before
    novelty: jax.Array  # nearest-neighbour distance of the drawn frame to the buffer
    stuck_score: jax.Array  # mean change over the last stuck_window frames (low = stuck)
    novelty_score: jax.Array  # mean novelty over the last novelty_window frames (high = off the dataset)
    fired: jax.Array  # bool: a detector fired after this frame
    recovering: jax.Array  # bool: this frame was drawn by an interpolation toward a recovery target
    target: jax.Array  # int: the buffer index of the recovery target in force (-1: none)


def window_scores(change: jax.Array, novelty: jax.Array, cfg: DriftConfig):
    """Windowed scores of [..., T] per-frame scores: (stuck_score, novelty_score) of the last frame of each full
    window, [..., T - window + 1] each (numpy-side, for whole recorded or drawn sequences)."""
    def trailing_mean(x, w):
        c = np.cumsum(np.asarray(x, np.float64), axis=-1)
        c = np.concatenate([np.zeros(c.shape[:-1] + (1,)), c], axis=-1)
        return (c[..., w:] - c[..., :-w]) / w
    return trailing_mean(change, cfg.stuck_window), trailing_mean(novelty, cfg.novelty_window)


class DriftState(NamedTuple):
    context: Frames
    changes: jax.Array  # [b, stuck_window], the newest last
    novelties: jax.Array  # [b, novelty_window]
    age: jax.Array  # [b] frames drawn since the rollout started or the last recovery ended
    left: jax.Array  # [b] interpolation steps left of a recovery (0: none)
    target: jax.Array  # [b] buffer index of the recovery target (-1: none)


class Recovery(NamedTuple):
    """What a drift-aware step needs besides the model: the buffer of dataset frames (pooled too) and the
    config. Built by `recovery_inputs`."""

    buffer: jax.Array  # [B, h, w, 3] dataset frames at the denoiser's resolution
    pooled: jax.Array  # pool_frames(buffer, cfg.pool)


def recovery_inputs(model: WorldModel, buffer: jax.Array, cfg: DriftConfig) -> Recovery:
    if cfg.recovery and model.denoiser.interpolation is None:
        raise ValueError("recovery interpolates toward a target frame, and this world model's denoiser was not "
                         "trained to: train one with --config.denoiser.interpolation.steps=10, or detect only "
                         "(recovery off)")
    chex.assert_shape(buffer, (None,) + tuple(model.resolution) + (3,))
    return Recovery(buffer, pool_frames(buffer, cfg.pool))


def init_state(context: Frames, cfg: DriftConfig) -> DriftState:
    """The detectors' state at the start of a rollout from a real context: empty windows, no recovery."""
    b = context.low.shape[0]
    return DriftState(context, jnp.zeros((b, cfg.stuck_window)), jnp.zeros((b, cfg.novelty_window)),
                      jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.full((b,), -1, jnp.int32))


def step(model: WorldModel, variables: Variables, cfg: DriftConfig, inputs: Recovery, state: DriftState,
         window: jax.Array, key: jax.Array):
    """One drawn frame with the detectors (and recovery with cfg.recovery): (state after it, (frame, Scores of
    it)). The frame is WorldModel.step's (same key) unless a recovery is under way."""
    ip = model.denoiser.interpolation
    recovering = state.left > 0
    if ip is None:
        nxt = model.step(variables, key, state.context, window)
    else:
        s = ip.steps - state.left  # the interpolation step, while recovering
        goal = inputs.buffer[jnp.maximum(state.target, 0)]
        seen = seen_target(ip, state.context.low[:, -1], goal, jnp.clip(s, 0, ip.steps - 1))
        target = jnp.where(recovering[:, None, None, None], seen, 0.0)
        bucket = jnp.where(recovering, s, ip.no_interpolation)
        nxt = model.step(variables, key, state.context, window, target, bucket)
    change = frame_mse(nxt.low, state.context.low[:, -1])
    novelty, index = nearest(nxt.low, inputs.pooled, cfg.pool)
    changes = jnp.concatenate([state.changes[:, 1:], change[:, None]], axis=1)
    novelties = jnp.concatenate([state.novelties[:, 1:], novelty[:, None]], axis=1)
    age = jnp.where(recovering, 0, state.age + 1)
    stuck_score, novelty_score = changes.mean(axis=1), novelties.mean(axis=1)
    fired = ((((age >= cfg.stuck_window) & (stuck_score < cfg.stuck_threshold))
              | ((age >= cfg.novelty_window) & (novelty_score > cfg.novelty_threshold))
              | (change > cfg.jump_threshold)) & ~recovering)
    left = jnp.maximum(state.left - 1, 0)
    target = jnp.where(left > 0, state.target, -1)
    if cfg.recovery:
        left = jnp.where(fired, ip.steps, left)
        target = jnp.where(fired, index, target)
    scores = Scores(change, novelty, stuck_score, novelty_score, fired, recovering,
                    jnp.where(recovering, state.target, -1))
    return DriftState(advance(state.context, nxt), changes, novelties, age, left, target), (nxt, scores)


def rollout(model: WorldModel, variables: Variables, key: jax.Array, context: Frames, act: jax.Array,
            num_steps: int, buffer: jax.Array, cfg: DriftConfig):
    """num_steps frames drawn open-loop as WorldModel.rollout (same arguments, same frames while no recovery
    runs), scored by the detectors and, with cfg.recovery, recovered: (frames [b, num_steps, ...], Scores)."""
    n = model.num_steps_conditioning
    chex.assert_equal(act.shape[1], n + num_steps - 1)
    inputs = recovery_inputs(model, buffer, cfg)
    _, drawn, scores = rollout_chunk(model, variables, jax.random.split(key, num_steps), init_state(context, cfg),
                                     act, inputs, cfg)
    return drawn, scores


def rollout_chunk(model: WorldModel, variables: Variables, keys: jax.Array, state: DriftState, act: jax.Array,
                  inputs: Recovery, cfg: DriftConfig):
    """len(keys) steps from a DriftState, one key each; act: [b, n + len(keys) - 1(, size)], the actions of the
    state's context but its last frame's, then one per step. (state after, frames [b, T, ...], Scores [b, T]):
    consecutive chunks with consecutive slices of one split of keys draw what one `rollout` draws."""
    n, num_steps = model.num_steps_conditioning, keys.shape[0]
    chex.assert_equal(act.shape[1], n + num_steps - 1)
    windows = jnp.stack([act[:, k:k + n] for k in range(num_steps)])
    state, (drawn, scores) = jax.lax.scan(lambda state, x: step(model, variables, cfg, inputs, state, *x), state,
                                          (windows, keys))
    drawn, scores = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (drawn, scores))
    return state, drawn, scores


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half): the area under the ROC curve
    of telling positives (degraded) from negatives (real) by the score."""
    neg, pos = np.asarray(negatives, np.float64).ravel(), np.asarray(positives, np.float64).ravel()
    if not len(neg) or not len(pos):
        raise ValueError("ROC AUC needs at least one negative and one positive score")
    both = np.concatenate([neg, pos])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    # Average ranks over ties (1-based), then the Mann-Whitney U of the positives.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2
    ranks[order] = np.repeat(mean_rank, counts)
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def stuck_fraction(stuck_score: np.ndarray, cfg: DriftConfig, skip: Optional[int] = None) -> float:
    """The fraction of the frames (after the first stuck_window, where the window is full) whose stuck score is
    below the threshold."""
    skip = cfg.stuck_window if skip is None else skip
    return float(np.mean(np.asarray(stuck_score)[..., skip:] < cfg.stuck_threshold))
