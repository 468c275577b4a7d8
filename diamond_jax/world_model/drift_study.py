"""The drift study of `python -m diamond_jax.world_model_eval --drift_steps=N`: long rollouts with and without
recovery, and how well the detectors tell real test frames from degraded ones (world_model/drift.py).

- Rollouts: `rows` real contexts from test episodes, then N frames drawn open-loop with random actions (the
  test episodes are shorter than such rollouts), once with recovery off and once on, with the same noise keys.
  Per step: the detectors' scores, whether a recovery ran, and the distance of the frame to the dataset: the MSE
  to its nearest neighbour among `reference_size` other training frames at the denoiser's resolution (no
  pooling), the same measure for both rollouts and apart from the detectors' buffer.
- Detectors on held-out data: every window of frames of the test episodes (stride `stride`) is a negative;
  the same windows degraded are positives: frozen (the first frame repeated), noise (Gaussian, std
  `noise_std` of the [-1, 1] range), teleport (the second half replaced by frames from elsewhere in the test
  episodes), morph (blended progressively into another test frame), and the model's own drift (windows of the
  recovery-off rollouts after `drift_after` steps). The ROC AUC of each detector's window score per kind.
"""

import dataclasses
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from diamond_jax.data.recorded import RecordedDataset
from diamond_jax.world_model import drift
from diamond_jax.world_model.model import Frames, WorldModel
from diamond_jax.world_model.watch import draw_starts, random_actions

DEGRADATIONS = ("frozen", "noise", "teleport", "morph", "model_drift")
DETECTORS = ("stuck", "jump", "novelty", "any")


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    num_steps: int = 1000  # frames per rollout
    rows: int = 4  # rollouts, each from its own real context
    seed: int = 0
    reference_size: int = 1024  # training frames of the distance-to-dataset measure
    stride: int = 8  # frames between the starts of the test windows
    noise_std: float = 0.1  # of the noise degradation, in [-1, 1] units
    drift_after: int = 100  # model-drift windows start after this many drawn frames
    chunk: int = 100  # steps per compiled call (the progress bar moves once per chunk)


def window_score(frames: np.ndarray, recovery: drift.Recovery, cfg: drift.DriftConfig,
                 nearest_fn) -> Dict[str, np.ndarray]:
    """Scores of windows [w, L, h, w, 3] (L = the longer detector window + 1), higher = more anomalous: stuck
    (minus the mean change over the last stuck_window steps), jump (the largest change), novelty (the mean
    nearest-neighbour distance of the last novelty_window frames) and any (each score over its threshold, the
    largest: > 1 exactly where a detector fires)."""
    change = np.mean((frames[:, 1:] - frames[:, :-1]) ** 2, axis=(2, 3, 4))
    flat = frames[:, -cfg.novelty_window:].reshape((-1,) + frames.shape[2:])
    novelty = np.asarray(nearest_fn(jnp.asarray(flat), recovery.pooled, cfg.pool)[0]).reshape(len(frames), -1)
    stuck_mean = change[:, -cfg.stuck_window:].mean(axis=1)
    scores = {"stuck": -stuck_mean, "jump": change.max(axis=1), "novelty": novelty.mean(axis=1)}
    scores["any"] = np.maximum.reduce([cfg.stuck_threshold / np.maximum(stuck_mean, 1e-12),
                                       scores["jump"] / max(cfg.jump_threshold, 1e-12),
                                       scores["novelty"] / max(cfg.novelty_threshold, 1e-12)])
    return scores


def degrade(windows: np.ndarray, kind: str, rng: np.random.Generator, pool: np.ndarray, noise_std: float) -> np.ndarray:
    """Windows [w, L, ...] degraded in one of the synthetic ways; pool: other test frames [p, ...]."""
    w, length = windows.shape[:2]
    if kind == "frozen":
        return np.repeat(windows[:, :1], length, axis=1)
    if kind == "noise":
        noisy = windows + rng.normal(0, noise_std, windows.shape).astype(np.float32)
        return np.floor((np.clip(noisy, -1, 1) + 1) / 2 * 255) / 127.5 - 1
    if kind == "teleport":
        out = windows.copy()
        half = length // 2
        starts = rng.integers(0, len(pool) - (length - half), w)
        for i, s in enumerate(starts):
            out[i, half:] = pool[s:s + length - half]
        return out
    if kind == "morph":
        other = pool[rng.integers(0, len(pool), w)]
        a = np.linspace(0, 1, length, dtype=np.float32)[None, :, None, None, None]
        return (1 - a) * windows + a * other[:, None]
    raise ValueError(f"unknown degradation {kind!r}")


def study(model: WorldModel, variables, dataset: RecordedDataset, cfg: drift.DriftConfig,
          options: StudyOptions = StudyOptions()) -> Dict[str, Any]:
    """The numbers (JSON-ready) under "results", and the arrays for pictures and videos."""
    o, n = options, model.num_steps_conditioning
    if model.denoiser.interpolation is None:
        raise ValueError("the drift study compares rollouts with and without recovery, which needs a denoiser "
                         "trained with interpolation (--config.denoiser.interpolation.steps=10)")
    buffer = drift.sample_buffer(dataset, model, cfg.buffer_size, o.seed)
    reference = drift.sample_buffer(dataset, model, o.reference_size, o.seed + 1)
    rng = np.random.default_rng([o.seed, 3])
    starts = draw_starts(dataset, rng, o.rows, n, "record longer test episodes")
    obs = np.stack([dataset.episode(e).obs[s:s + n] for e, s in starts])
    act = np.concatenate([np.stack([dataset.episode(e).act[s:s + n - 1] for e, s in starts]),
                          random_actions(dataset, rng, (o.rows, o.num_steps))], axis=1)
    context = model.frames(jnp.asarray(obs))
    context = Frames(context.low, context.full)
    key = jax.random.key(o.seed)
    nearest_fn = jax.jit(drift.nearest, static_argnums=(2,))
    distance_fn = jax.jit(lambda x: drift.nearest(x, reference, 1)[0])
    runs, results = {}, {"num_steps": o.num_steps, "rows": o.rows, "config": dataclasses.asdict(cfg),
                         "options": dataclasses.asdict(o), "rollouts": {}}
    keys = jax.random.split(key, o.num_steps)  # as drift.rollout splits them: the chunks draw what it draws
    bar = tqdm(total=2 * o.num_steps, desc="Long rollouts (recovery off, then on)", unit="step")
    for name, recover in (("off", False), ("on", True)):
        c = dataclasses.replace(cfg, recovery=recover)
        inputs = drift.recovery_inputs(model, buffer, c)
        fn = jax.jit(lambda v, k, state, a, c=c: drift.rollout_chunk(model, v, k, state, a, inputs, c))
        state, chunks = drift.init_state(context, c), []
        for start in range(0, o.num_steps, o.chunk):
            stop = min(o.num_steps, start + o.chunk)
            state, frames, scores = fn(variables, keys[start:stop], state, jnp.asarray(act[:, start:stop + n - 1]))
            chunks.append(jax.device_get((frames, scores)))
            bar.update(stop - start)
        frames, scores = jax.tree.map(lambda *x: np.concatenate(x, axis=1), *chunks)
        low = np.asarray(frames.low)
        distance = np.stack([np.asarray(distance_fn(jnp.asarray(row))) for row in low])
        runs[name] = {"frames": frames, "scores": scores, "distance": distance}
        stuck = np.asarray(scores.stuck_score)[:, cfg.stuck_window:] < cfg.stuck_threshold
        results["rollouts"][name] = {
            "fraction_stuck": float(stuck.mean()),
            "fraction_novel": float((np.asarray(scores.novelty_score)[:, cfg.novelty_window:]
                                     > cfg.novelty_threshold).mean()),
            "detections_per_row": np.asarray(scores.fired).sum(axis=1).tolist(),
            "fraction_recovering": float(np.asarray(scores.recovering).mean()),
            "distance_to_dataset_mean": float(distance.mean()),
            "distance_to_dataset_by_quarter": [float(q.mean()) for q in np.array_split(distance, 4, axis=1)],
        }
        bar.update(1)
    bar.close()
    results["auc"] = detector_auc(model, dataset, cfg, drift.recovery_inputs(model, buffer, cfg), nearest_fn,
                                  np.asarray(runs["off"]["frames"].low), options)
    return {"results": results, "runs": runs}


def detector_auc(model: WorldModel, dataset: RecordedDataset, cfg: drift.DriftConfig, recovery: drift.Recovery,
                 nearest_fn, drawn: np.ndarray, o: StudyOptions) -> Dict[str, Any]:
    """ROC AUC of each detector per degradation, on windows of the test episodes (module docstring)."""
    length = max(cfg.stuck_window, cfg.novelty_window) + 1
    episodes = [np.asarray(model.low_res(jnp.asarray(dataset.episode(e).obs[:])))
                for e in dataset.episode_ids("test")]
    windows = np.stack([ep[s:s + length] for ep in episodes for s in range(0, len(ep) - length + 1, o.stride)])
    pool = np.concatenate(episodes)
    rng = np.random.default_rng([o.seed, 4])
    real = window_score(windows, recovery, cfg, nearest_fn)
    out: Dict[str, Any] = {"windows": int(len(windows)), "window_length": length, "by_degradation": {}}
    for kind in DEGRADATIONS:
        if kind == "model_drift":
            after = drawn[:, o.drift_after:]
            if after.shape[1] < length:
                out["notes"] = [f"no model_drift windows: rollouts of {drawn.shape[1]} steps hold no window of "
                                f"{length} frames after step {o.drift_after}"]
                continue
            bad = np.stack([row[s:s + length] for row in after
                            for s in range(0, after.shape[1] - length + 1, o.stride)])
        else:
            bad = degrade(windows, kind, rng, pool, o.noise_std)
        scores = window_score(bad, recovery, cfg, nearest_fn)
        out["by_degradation"][kind] = {d: drift.roc_auc(real[d], scores[d]) for d in DETECTORS}
        out["by_degradation"][kind]["fired_fraction"] = float(np.mean(scores["any"] > 1))
    out["real_fired_fraction"] = float(np.mean(real["any"] > 1))
    return out


def plot(study_out: Dict[str, Any], cfg: drift.DriftConfig, path: str) -> None:
    """drift_scores.png: per step (mean over rows), the stuck score, the novelty score and the distance to the
    dataset, recovery off and on; the frames drawn by a recovery shaded (row 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = study_out["runs"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    panels = (("stuck_score", f"mean change, last {cfg.stuck_window} frames (low = stuck)", cfg.stuck_threshold),
              ("novelty_score", f"nearest-neighbour distance, last {cfg.novelty_window} frames",
               cfg.novelty_threshold),
              ("distance", "distance to the dataset (nearest of 1,024 frames, MSE)", None))
    for ax, (field, title, threshold) in zip(axes, panels):
        for name, colour in (("off", "tab:red"), ("on", "tab:blue")):
            run = runs[name]
            values = run["distance"] if field == "distance" else np.asarray(getattr(run["scores"], field))
            ax.plot(np.arange(1, values.shape[1] + 1), values.mean(axis=0), color=colour, lw=0.9,
                    label=f"recovery {name}")
        if threshold is not None:
            ax.axhline(threshold, color="k", ls="--", lw=0.8, label="threshold")
        recovering = np.asarray(runs["on"]["scores"].recovering)[0]
        for t in np.flatnonzero(recovering):
            ax.axvspan(t + 0.5, t + 1.5, color="tab:blue", alpha=0.08, lw=0)
        ax.set_yscale("symlog", linthresh=1e-6) if field == "stuck_score" else None
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("step (frames drawn open loop); shaded: frames of recoveries, row 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def frames_picture(study_out: Dict[str, Any], steps: List[int], row: int = 0, scale: int = 2) -> np.ndarray:
    """uint8 image: one rollout's frames at `steps`, recovery off above, on below."""
    from diamond_jax.video import grid, upscale

    lines = []
    for name in ("off", "on"):
        low = np.asarray(study_out["runs"][name]["frames"].low)[row]
        lines.append(grid([to_uint8(low[s - 1]) for s in steps]))
    return upscale(grid(lines, axis=-3, gap=4), scale).astype(np.uint8)


def video_frames(study_out: Dict[str, Any], scale: int = 3) -> np.ndarray:
    """uint8 [T, H, W, 3]: every row's rollout, recovery off (left) beside on (right), rows stacked."""
    from diamond_jax.video import grid, upscale

    off = to_uint8(np.asarray(study_out["runs"]["off"]["frames"].low))
    on = to_uint8(np.asarray(study_out["runs"]["on"]["frames"].low))
    rows = [grid([off[i], on[i]], axis=-2, gap=4) for i in range(len(off))]
    return upscale(grid(rows, axis=-3, gap=4), scale).astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
