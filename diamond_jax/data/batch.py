"""A batch of segments, the unit every model trains on."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Batch(NamedTuple):
    """Segments of t consecutive steps, time-major after the batch axis.

    obs:          float32 [b, t, h, w, 3] frames in [-1, 1]; padding frames are 0. In segments that run past
                  an episode's last step, the frame after that step is the episode's real final frame.
    act:          int32   [b, t] action taken at each frame
    rew:          float32 [b, t] raw reward received after the action
    end:          int32   [b, t] 1 where the episode ended after the action
    trunc:        int32   [b, t] 1 where the episode was cut (time limit) after the action
    mask_padding: bool    [b, t] True at real steps, False at padding
    """

    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    end: jax.Array
    trunc: jax.Array
    mask_padding: jax.Array


def obs_from_frames(frames: jax.Array) -> jax.Array:
    """uint8 frames -> float32 observations in [-1, 1], as the models see them (uint8 / 255 * 2 - 1)."""
    return frames.astype(jnp.float32) / 255.0 * 2.0 - 1.0
