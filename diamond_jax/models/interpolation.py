"""Dual-purpose training of the denoiser: autoregressive prediction and interpolation toward a target frame
(Gijsen & Ritter, "Distribution recovery in compact diffusion world models via conditioned frame
interpolation"; README "Long rollouts: drift detection and recovery").

A denoiser built with an `Interpolation` sees two more inputs: a target frame (stacked with the noised frame)
and one of m + 1 bucket embeddings: bucket s < m says "this is step s of m of an interpolation toward the
target", bucket m says "no interpolation" (the target is then dropped: a zero frame, mid-grey). In training a
batch, with probability p_interpolate, interpolates toward the frame m steps after its context; otherwise it
is ordinary autoregressive training with the target dropped.

The paper's measures against collapsing onto the target, each a field: `motion_weighting` weighs segments
with large frame differences more in the loss (a random agent stuck against a wall otherwise teaches the model
to repeat frames); `intermediate_targets` gives step s, in place of the target itself, a blend of the current
frame and the target with the target's weight ((s + 1) / m) ** intermediate_power growing to 1 at the last
step (power 2 is the paper's "quadratic rather than linear interpolation").
"""

import dataclasses
from typing import Any, Dict, Tuple

import chex
import jax
import jax.numpy as jnp

from diamond_jax.data.batch import Batch

IMG_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class Interpolation:
    """The interpolation inputs and their training (the defaults are the paper's where it gives them)."""

    steps: int = 10  # m: interpolation steps from the current frame to the target; m + 1 bucket embeddings
    p_interpolate: float = 0.25  # training probability that a batch interpolates (else autoregressive)
    motion_weighting: bool = False  # weigh segments by their frame differences in the loss
    motion_floor: float = 0.1  # a still segment's weight, relative to a segment of average motion (1 + floor)
    intermediate_targets: bool = False  # step s sees a blend of current frame and target, not the target
    intermediate_power: float = 2.0  # the blend's target weight is ((s + 1) / m) ** power; 2 = quadratic
    autoregressive_steps: int = 1  # frames predicted per training segment (denoiser.training's), <= steps

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"interpolation steps={self.steps}: use an integer >= 1 (the paper's 10)")
        if not 1 <= self.autoregressive_steps <= self.steps:
            raise ValueError(f"{self.autoregressive_steps} autoregressive training steps with {self.steps} "
                             "interpolation steps: the predicted frames must fit in the interpolation; use at most "
                             "as many")
        if not 0 <= self.p_interpolate <= 1:
            raise ValueError(f"p_interpolate={self.p_interpolate}: use a probability in [0, 1] (the paper's 0.25)")
        if not self.motion_floor > 0:
            raise ValueError(f"motion_floor={self.motion_floor}: use a number > 0 (e.g. 0.1)")
        if not self.intermediate_power > 0:
            raise ValueError(f"intermediate_power={self.intermediate_power}: use a number > 0 (1 linear, 2 "
                             "quadratic)")

    @property
    def num_buckets(self) -> int:
        return self.steps + 1

    @property
    def no_interpolation(self) -> int:
        """The bucket of autoregressive generation (the target dropped)."""
        return self.steps


def target_weight(ip: Interpolation, step: jax.Array) -> jax.Array:
    """The target's weight in the frame seen at interpolation step `step` (0..m-1): ((s + 1) / m) ** power with
    intermediate targets (1 at the last step), else 1 (the target itself)."""
    if not ip.intermediate_targets:
        return jnp.ones_like(step, jnp.float32)
    return ((step.astype(jnp.float32) + 1) / ip.steps) ** ip.intermediate_power


def seen_target(ip: Interpolation, current: jax.Array, target: jax.Array, step: jax.Array) -> jax.Array:
    """The target frame the denoiser sees at interpolation step `step` [b], from the current (newest) frame and the
    target [b, h, w, c]: the blend of intermediate targets, or the target."""
    w = target_weight(ip, step)[:, None, None, None]
    return (1 - w) * current + w * target


def motion_weights(ip: Interpolation, obs: jax.Array) -> jax.Array:
    """[b] loss weights of segments obs [b, t, h, w, c], of mean 1 over the batch: floor + (the segment's mean
    squared difference between consecutive frames) / (its batch mean), divided by floor + 1. All ones without
    motion weighting."""
    b = obs.shape[0]
    if not ip.motion_weighting:
        return jnp.ones((b,), jnp.float32)
    motion = jnp.mean((obs[:, 1:] - obs[:, :-1]) ** 2, axis=(1, 2, 3, 4))
    relative = motion / jnp.maximum(jnp.mean(motion), 1e-12)
    return (ip.motion_floor + relative) / (ip.motion_floor + 1)


def segment_length(ip: Interpolation, num_steps_conditioning: int) -> int:
    """Frames per training segment: the context, then the m frames of an interpolation (the target last)."""
    return num_steps_conditioning + ip.steps


def loss(denoiser, params: Any, buffers: Any, batch: Batch, key: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The dual-purpose loss on segments of n + m frames (segment_length).

    Each row trains on a window of n + k frames (k = t_ar, the number of autoregressive steps) starting at a
    uniformly drawn offset o in [0, m - k]: its predicted frame i is interpolation step o + i of the interpolation
    from the context's last frame to the segment's last frame (the target, reached at step m - 1). One draw per
    batch decides whether the batch interpolates (buckets o + i, the target seen) or not (bucket m, target
    dropped). As in the plain loss, each frame after the first is predicted from the model's own denoised output.
    """
    ip: Interpolation = denoiser.interpolation
    n, m = denoiser.num_steps_conditioning, ip.steps
    b, t = batch.act.shape[:2]
    chex.assert_shape(batch.obs, (b, t, None, None, IMG_CHANNELS))
    if t != n + m:
        raise ValueError(f"interpolation training needs segments of n + m = {n + m} frames, got {t}")
    key_offset, key_mode, key_loop = jax.random.split(key, 3)
    num_predicted = ip.autoregressive_steps
    offsets = jax.random.randint(key_offset, (b,), 0, m - num_predicted + 1)
    interpolate = jax.random.bernoulli(key_mode, ip.p_interpolate)
    window = offsets[:, None] + jnp.arange(n + num_predicted)[None]
    take = lambda x: jnp.take_along_axis(x, window.reshape(window.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    all_obs, act, mask_padding = take(batch.obs), take(batch.act), take(batch.mask_padding)
    goal = batch.obs[:, -1]
    weights = motion_weights(ip, batch.obs)
    variables = {"params": params, "buffers": buffers}
    losses = []
    for i, key_i in enumerate(jax.random.split(key_loop, num_predicted)):
        key_sigma, key_noise, *key_null = jax.random.split(key_i, 3 if denoiser.has_null_inputs else 2)
        next_obs, mask = all_obs[:, n + i], mask_padding[:, n + i]
        step = offsets + i
        bucket = jnp.where(interpolate, step, ip.no_interpolation)
        target = jnp.where(interpolate, seen_target(ip, all_obs[:, n + i - 1], goal, step), 0.0)
        sigma = denoiser.sample_sigma_training(key_sigma, b)
        noisy_next_obs = denoiser.apply_noise(key_noise, next_obs, sigma)
        cs = denoiser.conditioners(sigma)
        masked = {"null": denoiser.sample_null(key_null[0], b)} if denoiser.has_null_inputs else {}
        model_output = denoiser.model_output(variables, noisy_next_obs, all_obs[:, i:n + i], act[:, i:n + i], cs,
                                             target=target, bucket=bucket, **masked)
        edm_target = (next_obs - cs.c_skip * noisy_next_obs) / cs.c_out
        per_row = jnp.mean((model_output - edm_target) ** 2, axis=(1, 2, 3))
        mask = mask.astype(jnp.float32)
        losses.append(jnp.sum(per_row * weights * mask) / jnp.maximum(jnp.sum(mask), 1))
        denoised = jax.lax.stop_gradient(denoiser.wrap_model_output(noisy_next_obs, model_output, cs))
        all_obs = all_obs.at[:, n + i].set(denoised)
    total = jnp.mean(jnp.stack(losses))
    return total, {"loss_denoising": total, "interpolating": interpolate.astype(jnp.float32)}
