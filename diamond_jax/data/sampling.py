"""Segment sampling from the device mirror of the replay dataset (`DeviceReplay`), as the official
BatchSampler draws and cuts segments: pure JAX functions, jittable, whose programs depend on the mirror's
capacities only."""

from typing import Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

from diamond_jax.data.batch import Batch, obs_from_frames
from diamond_jax.data.replay import DeviceReplay


def episode_weights(ep_length: jax.Array, num_episodes: jax.Array,
                    sample_weights: Optional[Sequence[float]]) -> jax.Array:
    """Unnormalised probabilities [ep_cap] of picking each episode, as the official BatchSampler.

    With sample_weights (w_1..w_K) and at least K episodes, the episodes split by id into K groups of
    num_episodes // K (the last one takes the remainder) and group g's weight w_g is spread evenly over its
    episodes. Otherwise, episodes weigh their length. Rows past num_episodes weigh 0.
    """
    ids = jnp.arange(ep_length.shape[0])
    valid = ids < num_episodes
    by_length = jnp.where(valid, ep_length, 0).astype(jnp.float32)
    if sample_weights is None:
        return by_length
    k = len(sample_weights)
    group_size = num_episodes // k
    group = jnp.minimum(ids // jnp.maximum(group_size, 1), k - 1)
    size_of_group = jnp.where(group == k - 1, group_size + num_episodes % k, group_size)
    by_group = jnp.asarray(sample_weights, jnp.float32)[group] / jnp.maximum(size_of_group, 1)
    return jnp.where(num_episodes < k, by_length, jnp.where(valid, by_group, 0.0))


def sample_segments(replay: DeviceReplay, key: jax.Array, batch_size: int, seq_length: int,
                    sample_weights: Optional[Sequence[float]], can_sample_beyond_end: bool,
                    include_final_frame: bool = False) -> Batch:
    """A batch of segments of seq_length steps, drawn as the official BatchSampler does (`draw_segments`)
    and cut with padding at the episode boundaries (`gather_segments`). Pure and jittable with batch_size,
    seq_length, sample_weights (a tuple, or None), can_sample_beyond_end and include_final_frame static. The
    dataset must hold at least one step.

    include_final_frame (only without can_sample_beyond_end): segments may end on an episode's final frame,
    and mask_padding marks real frames instead of real steps, so that a denoiser learns to draw the frame
    an episode ends on (the official sampler never gives it one as a target)."""
    if include_final_frame and can_sample_beyond_end:
        raise ValueError("include_final_frame applies to segments that stop at the episode's end "
                         "(can_sample_beyond_end=False); segments beyond the end hold the final frame already")
    episode, start = draw_segments(replay, key, batch_size, seq_length, sample_weights, can_sample_beyond_end,
                                   include_final_frame)
    return gather_segments(replay, episode, start, seq_length, mask_frames=include_final_frame)


def draw_segments(replay: DeviceReplay, key: jax.Array, batch_size: int, seq_length: int,
                  sample_weights: Optional[Sequence[float]], can_sample_beyond_end: bool,
                  include_final_frame: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Episode ids [b] and segment starts [b] (positions in the episode, negative before its start).

    Episode by `episode_weights`, then a timestep t uniform among its L steps, then the segment:
    - can_sample_beyond_end=False (denoiser, actor-critic burn-in): stop = min(L, t + 1 + U{0..seq_length-1}),
      start = stop - seq_length: padding only before the episode's start;
    - can_sample_beyond_end=True (reward/end model): start = t - U{0..seq_length-1}, stop = start + seq_length;
    - include_final_frame=True: as the first, over the episode's L + 1 frames instead of its L steps
      (t uniform among L + 1, stop = min(L + 1, ...)), so that a segment may end on the final frame.
    """
    key_episode, key_t, key_offset = jax.random.split(key, 3)
    episode = _draw_episodes(key_episode, episode_weights(replay.ep_length, replay.num_episodes, sample_weights),
                             batch_size)
    length = replay.ep_length[episode]
    positions = length + 1 if include_final_frame else length
    t = jax.random.randint(key_t, (batch_size,), 0, positions)
    offset = jax.random.randint(key_offset, (batch_size,), 0, seq_length)
    if can_sample_beyond_end:
        return episode, t - offset
    return episode, jnp.minimum(positions, t + 1 + offset) - seq_length


def _draw_episodes(key: jax.Array, weights: jax.Array, batch_size: int) -> jax.Array:
    """Indices drawn with probability proportional to weights, by inverting the cumulative sum
    (jax.random.categorical draws a Gumbel for every row and sample: 50 times slower on CPU)."""
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(key, (batch_size,)) * cdf[-1]
    index = jnp.searchsorted(cdf, u, side="right")  # the first row whose interval holds u: never a 0 weight
    # When u * total rounds up to total, take the last row that can be drawn.
    last = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[0]), 0))
    return jnp.minimum(index, last).astype(jnp.int32)


def gather_segments(replay: DeviceReplay, episode: jax.Array, start: jax.Array, seq_length: int,
                    mask_frames: bool = False) -> Batch:
    """The segments [start, start + seq_length) of the given episodes.

    Position k of an episode of L steps holds a real frame iff 0 <= k <= L (k = L: the frame after the last
    step, the real final frame of an ended episode) and a real step iff 0 <= k < L; padding has obs 0,
    act/rew/end/trunc 0 and mask_padding False. mask_padding marks the real steps, or with mask_frames the
    real frames (True at k = L too).
    """
    b = episode.shape[0]
    chex.assert_shape(start, (b,))
    k = start[:, None] + jnp.arange(seq_length)  # [b, T]
    length = replay.ep_length[episode][:, None]
    frame_real = (k >= 0) & (k <= length)
    step_real = (k >= 0) & (k < length)
    lane = replay.ep_lane[episode][:, None]
    slot = replay.ep_start[episode][:, None] + jnp.clip(k, 0, length)
    obs = jnp.where(frame_real[..., None, None, None], obs_from_frames(replay.frames[lane, slot]), 0.0)
    batch = Batch(
        obs=obs,
        act=jnp.where(step_real, replay.act[lane, slot], 0),
        rew=jnp.where(step_real, replay.rew[lane, slot], 0.0),
        end=jnp.where(step_real, replay.end[lane, slot], False).astype(jnp.int32),
        trunc=jnp.where(step_real, replay.trunc[lane, slot], False).astype(jnp.int32),
        mask_padding=frame_real if mask_frames else step_real,
    )
    chex.assert_shape(batch.obs, (b, seq_length) + replay.frames.shape[2:])
    chex.assert_shape([batch.act, batch.rew, batch.end, batch.trunc, batch.mask_padding], (b, seq_length))
    return batch
