"""The upsampler: a second EDM denoiser that draws the full-resolution next frame from the low-resolution one, as
the official release's CS:GO model does.

It is a `Denoiser` without actions whose conditioning frames are the previous `num_past` full-resolution
frames followed by the low-resolution next frame resized to full resolution (bicubic); everything else (EDM
preconditioning, loss, sampler) is the denoiser's. Frames are NHWC in [-1, 1].
"""

import dataclasses
from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from diamond_jax.data.batch import Batch
from diamond_jax.models.denoiser import Denoiser, Variables
from diamond_jax.models.sampler import SamplerConfig, sample_next_obs

Size = Tuple[int, int]  # (height, width)


def resize_frames(x: jax.Array, size: Size) -> jax.Array:
    """Frames [..., h, w, 3] in [-1, 1] resized to size and rounded to the nearest of the 256 levels of a uint8
    frame (not truncated as the denoiser's output is: resizing a frame of level 100 gives 99.99998, which must
    stay 100): bicubic when growing (the official upsampler's input), antialiased linear when shrinking (a
    low-resolution frame should average the pixels it covers, not pick some)."""
    h, w = x.shape[-3:-1]
    if (h, w) == tuple(size):
        return x
    method = "linear" if size[0] <= h and size[1] <= w else "cubic"
    shape = x.shape[:-3] + tuple(size) + x.shape[-1:]
    levels = jnp.round((jnp.clip(jax.image.resize(x, shape, method=method, antialias=True), -1, 1) + 1) * 127.5)
    return levels / 127.5 - 1


@dataclasses.dataclass(frozen=True)
class Upsampler:
    denoiser: Denoiser  # action_kind "none"; its num_steps_conditioning is num_past + 1
    size: Size  # full resolution (height, width)

    def __post_init__(self):
        if self.denoiser.action_kind != "none" or self.denoiser.num_steps_conditioning < 2:
            raise ValueError("the upsampler's denoiser takes no actions and conditions on num_past >= 1 "
                             "full-resolution frames plus the low-resolution frame")

    @classmethod
    def from_config(cls, config, size: Size) -> "Upsampler":
        """config.upsampler.inner_model.num_steps_conditioning counts the past full-resolution frames."""
        n = config.upsampler.inner_model.num_steps_conditioning
        denoiser = Denoiser.from_config(config, 0, "none", section="upsampler")
        return cls(dataclasses.replace(denoiser, num_steps_conditioning=n + 1), tuple(size))

    @property
    def num_past(self) -> int:
        return self.denoiser.num_steps_conditioning - 1

    def init(self, key: jax.Array) -> Variables:
        return self.denoiser.init(key, self.size)

    def context(self, past: jax.Array, low_res_next: jax.Array) -> jax.Array:
        """[b, num_past + 1, H, W, 3]: the past full-resolution frames [b, num_past, H, W, 3], then the
        low-resolution next frame [b, h, w, 3] resized to full resolution."""
        b = past.shape[0]
        chex.assert_shape(past, (b, self.num_past) + tuple(self.size) + (3,))
        return jnp.concatenate([past, resize_frames(low_res_next, self.size)[:, None]], axis=1)

    def batch(self, obs: jax.Array, low_res: jax.Array) -> Batch:
        """The denoiser's training batch for segments of num_past + 1 full-resolution frames obs [b, t, H, W, 3]
        and their low-resolution copies [b, t, h, w, 3]: the context frames, then the frame to draw."""
        b, t = obs.shape[:2]
        chex.assert_equal(t, self.num_past + 1)
        frames = jnp.concatenate([self.context(obs[:, :-1], low_res[:, -1]), obs[:, -1:]], axis=1)
        zeros = jnp.zeros((b, t + 1), jnp.int32)
        return Batch(frames, zeros, zeros.astype(jnp.float32), zeros, zeros, jnp.ones((b, t + 1), bool))

    def loss(self, params, buffers, obs: jax.Array, low_res: jax.Array, key: jax.Array):
        return self.denoiser.loss(params, buffers, self.batch(obs, low_res), key)

    def sample(self, variables: Variables, key: jax.Array, past: jax.Array, low_res_next: jax.Array,
               cfg: SamplerConfig) -> jax.Array:
        """The full-resolution next frame [b, H, W, 3]."""
        context = self.context(past, low_res_next)
        return sample_next_obs(self.denoiser, variables, key, context, self.denoiser.dummy_actions(past.shape[0]),
                               cfg)
