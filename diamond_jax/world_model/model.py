"""A world model of recorded play as pure functions: the denoiser drawing low-resolution frames from past frames
and actions, optionally chained with the upsampler drawing the full-resolution frame.

A latent world model (`denoiser.space = "latent"`) denoises the latents of an autoencoder (models/autoencoder.py)
instead of pixels: its frames carry the latents beside the pixels (`Frames.latent`), the denoiser draws the
next latent from past latents, and the autoencoder decodes it into the frame that is shown and scored.

Frames enter as uint8 [..., H, W, 3] at the dataset's size and are resized to each model's resolution; the
models see them in [-1, 1]. Actions follow the dataset's: int32 [b, t] (discrete) or float32 [b, t, size].
`act[t]` is the action taken on frame t, so the frame after frames 0..n-1 is drawn from act[0:n].
"""

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from diamond_jax.data.batch import obs_from_frames
from diamond_jax.models.autoencoder import Autoencoder
from diamond_jax.models.denoiser import Denoiser
from diamond_jax.models.sampler import SamplerConfig, sample_next_obs
from diamond_jax.models.upsampler import Size, Upsampler, resize_frames
from diamond_jax.world_model.config import full_resolution

# {"denoiser": ..., "upsampler": ...}, each {"params", "buffers"}; a latent world model's also "autoencoder".
Variables = Dict[str, Any]
SPACES = ("pixel", "latent")  # config.denoiser.space


class Frames(NamedTuple):
    low: jax.Array  # [b, ..., h, w, 3] at the denoiser's resolution, in [-1, 1]
    full: Optional[jax.Array]  # [b, ..., H, W, 3] at the upsampler's, or None without an upsampler
    # [b, ..., h / f, w / f, latent_channels]: the scaled latents of `low`, what a latent world model's denoiser
    # sees; None in pixel space.
    latent: Optional[jax.Array] = None


def advance(context: Frames, new: Frames) -> Frames:
    """The context after a drawn frame: its oldest frame dropped, the new one ([b, ...]) appended."""
    shift = lambda past, frame: jnp.concatenate([past[:, 1:], frame[:, None]], axis=1)  # noqa: E731
    return Frames(*(None if past is None else shift(past, frame) for past, frame in zip(context, new)))


def frames_window(frames: Frames, rows, start: int, stop: int) -> Frames:
    """frames[rows, start:stop] of every level there is."""
    return Frames(*(None if x is None else x[rows, start:stop] for x in frames))


def sampler_config(section) -> SamplerConfig:
    return SamplerConfig(**section.to_dict())


@dataclasses.dataclass(frozen=True)
class WorldModel:
    denoiser: Denoiser
    sampler: SamplerConfig
    resolution: Size
    upsampler: Optional[Upsampler] = None
    upsampler_sampler: Optional[SamplerConfig] = None
    # Every frame drawn on the denoiser's null inputs (a model trained with condition_dropout > 0): with
    # condition_dropout_target "actions" an action-free video model, with "all" frames from no context at all.
    unconditional: bool = False
    autoencoder: Optional[Autoencoder] = None  # a latent world model's; None in pixel space

    @classmethod
    def from_config(cls, config, action_size: int, frame_shape: Tuple[int, int],
                    autoencoder: Optional[Autoencoder] = None, sigma_data: Optional[float] = None) -> "WorldModel":
        """action_size: the number of discrete actions, or the length of an action vector. A latent world model
        (config.denoiser.space "latent") needs its autoencoder and sigma_data in latent units (latent.py)."""
        denoiser = Denoiser.from_config(config, action_size, config.action_kind)
        if config.denoiser.get("space", "pixel") == "latent":
            if autoencoder is None or sigma_data is None:
                raise ValueError("a latent world model needs its autoencoder and its sigma_data")
            autoencoder.check_size(tuple(config.resolution))
            denoiser = dataclasses.replace(denoiser, img_channels=autoencoder.latent_channels, quantize=False,
                                           sigma_data=float(sigma_data))
        else:
            autoencoder = None
        upsampler = None
        if config.upsampler.enabled:
            upsampler = Upsampler.from_config(config, full_resolution(config, frame_shape))
        return cls(denoiser, sampler_config(config.sampler), tuple(config.resolution), upsampler,
                   sampler_config(config.upsampler.sampler) if upsampler else None, autoencoder=autoencoder)

    def with_sampling(self, guidance_scale: Optional[float] = None, unconditional: bool = False) -> "WorldModel":
        """This model sampled with another guidance weight (None: its config's) or unconditionally; ValueError
        with the fix where the denoiser cannot (no null inputs), or the two are asked together."""
        w = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"guidance scale {w}: use a finite number >= 0 (0 = plain conditional sampling)")
        if (w > 0 or unconditional) and not self.denoiser.has_null_inputs:
            asked = "unconditional sampling" if unconditional else f"guidance scale {w}"
            raise ValueError(f"{asked} needs a denoiser trained with masked conditioning, and this one has no null "
                             "inputs (denoiser.condition_dropout 0). Fix: train with "
                             "--config.denoiser.condition_dropout=0.2, or sample conditionally without guidance.")
        if w > 0 and unconditional:
            raise ValueError(f"guidance scale {w} combines conditional and unconditional predictions, so it does "
                             "not go with unconditional sampling. Fix: sample unconditionally with guidance scale 0 "
                             "(it overrides the run's), or conditionally with guidance.")
        return dataclasses.replace(self, sampler=dataclasses.replace(self.sampler, guidance_scale=w),
                                   unconditional=unconditional)

    @property
    def num_steps_conditioning(self) -> int:
        return self.denoiser.num_steps_conditioning

    @property
    def denoised_size(self) -> Tuple[int, int]:
        """(height, width) of what the denoiser draws: the frame, or its latent."""
        if self.autoencoder is None:
            return self.resolution
        return self.autoencoder.latent_shape(self.resolution)[:2]

    def init(self, key: jax.Array) -> Variables:
        """The trained models' variables (a latent world model's autoencoder is trained apart: not here)."""
        key_denoiser, key_upsampler = jax.random.split(key)
        variables = {"denoiser": self.denoiser.init(key_denoiser, self.denoised_size)}
        if self.upsampler is not None:
            variables["upsampler"] = self.upsampler.init(key_upsampler)
        return variables

    def low_res(self, frames: jax.Array) -> jax.Array:
        """uint8 frames at any size -> the denoiser's frames in [-1, 1]."""
        return resize_frames(obs_from_frames(frames), self.resolution)

    def full_res(self, frames: jax.Array) -> jax.Array:
        return resize_frames(obs_from_frames(frames), self.upsampler.size)

    def frames(self, frames: jax.Array, variables: Optional[Variables] = None) -> Frames:
        """Recorded uint8 frames as the models see them; a latent world model's encoded with the autoencoder of
        `variables`."""
        low = self.low_res(frames)
        if self.autoencoder is not None:
            return Frames(low, None, self.autoencoder.encode(variables["autoencoder"], low))
        return Frames(low, None if self.upsampler is None else self.full_res(frames))

    def denoiser_obs(self, obs: jax.Array) -> jax.Array:
        """What the denoiser trains on, from a batch's obs: uint8 frames resized (pixel space), or latents as the
        latent dataset gives them (latent.py)."""
        return obs if self.autoencoder is not None else self.low_res(obs)

    def step(self, variables: Variables, key: jax.Array, context: Frames, act: jax.Array,
             target: Optional[jax.Array] = None, bucket: Optional[jax.Array] = None) -> Frames:
        """The next frame after a context (low: [b, n, h, w, 3]; full: its last num_past frames at full
        resolution, or None) and its n actions. target [b, h, w, 3] and bucket int [b]: the denoiser's
        interpolation inputs (world_model/drift.py), None for plain autoregressive generation."""
        b, n = context.low.shape[:2]
        chex.assert_equal(n, self.num_steps_conditioning)
        key_low, key_full = jax.random.split(key)
        null = jnp.ones((b,), bool) if self.unconditional else None
        if self.autoencoder is not None:
            latent = sample_next_obs(self.denoiser, variables["denoiser"], key_low, context.latent, act, self.sampler,
                                     null=null)
            return Frames(self.autoencoder.decode_frames(variables["autoencoder"], latent), None, latent)
        low = sample_next_obs(self.denoiser, variables["denoiser"], key_low, context.low, act, self.sampler,
                              null=null, target=target, bucket=bucket)
        if self.upsampler is None:
            return Frames(low, None)
        past = context.full[:, context.full.shape[1] - self.upsampler.num_past:]
        return Frames(low, self.upsampler.sample(variables["upsampler"], key_full, past, low, self.upsampler_sampler))

    def rollout(self, variables: Variables, key: jax.Array, context: Frames, act: jax.Array,
                num_steps: int) -> Frames:
        """num_steps frames drawn open-loop, each from the model's own previous frames: [b, num_steps, ...].
        act: [b, n + num_steps - 1(, size)], the context's actions then one per drawn frame but the last."""
        n = self.num_steps_conditioning
        chex.assert_equal(act.shape[1], n + num_steps - 1)
        windows = jnp.stack([act[:, k:k + n] for k in range(num_steps)])  # [num_steps, b, n(, size)]

        def step(ctx: Frames, inputs):
            window, key_k = inputs
            nxt = self.step(variables, key_k, ctx, window)
            return advance(ctx, nxt), nxt

        _, drawn = jax.lax.scan(step, context, (windows, jax.random.split(key, num_steps)))
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), drawn)
