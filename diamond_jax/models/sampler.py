"""The sampler of the next frame: Karras schedule, Euler or Heun, optional churn.

Everything is JAX control flow over a static schedule, so a call traces to one program that can sit inside
`lax.scan`, `vmap` and `jit`.
"""

import dataclasses
import math
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, sigma) -> clipped, quantised D(x, sigma)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    num_steps_denoising: int = 3
    sigma_min: float = 2e-3
    sigma_max: float = 5.0
    rho: float = 7.0
    order: int = 1
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    # Classifier-free guidance weight w (the paper's equation 4) of every denoiser call; 0 = plain conditional
    # sampling. w > 0 needs a denoiser trained with condition_dropout > 0.
    guidance_scale: float = 0.0

    @classmethod
    def from_config(cls, config) -> "SamplerConfig":
        return cls(**config.world_model_env.sampler.to_dict())


def build_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """Karras et al.'s schedule: n noise levels from sigma_max down to sigma_min, then a final 0."""
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    l = np.linspace(0, 1, num_steps)
    sigmas = (max_inv_rho + l * (min_inv_rho - max_inv_rho)) ** rho
    return np.append(sigmas, 0.0).astype(np.float32)


def sample(denoise: DenoiseFn, key: jax.Array, shape, cfg: SamplerConfig, x_start: Optional[jax.Array] = None,
           return_trajectory: bool = False) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """Integrates the probability-flow ODE from x ~ N(0, I) at sigma_max down to sigma = 0.

    As in the official code the start noise is not scaled by sigma_max. Churn follows EDM (Karras et al.,
    Algorithm 2), evaluating D at the raised level sigma_hat; with the default s_churn = 0 it is inactive.

    x_start: the start noise (shape `shape`) in place of the draw from `key`, to reproduce a sample from
    given noise; `key` then only drives churn. return_trajectory: also return the points [n + 1, *shape] the
    sampler visits on the schedule: x_start at sigmas[0], x after each of the n - 1 steps at sigmas[1..n-1],
    and the sample at sigma 0 (with churn, each step starts from the point raised to sigma_hat, not listed).
    """
    n = cfg.num_steps_denoising
    sigmas = build_sigmas(n, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    gamma_max = min(cfg.s_churn / n, math.sqrt(2) - 1)
    key_init, key_churn = jax.random.split(key)
    if x_start is None:
        x_start = jax.random.normal(key_init, shape)
    elif x_start.shape != tuple(shape):
        raise ValueError(f"x_start has shape {x_start.shape}, the sample's is {tuple(shape)}")

    def churn(x, sigma, key):
        if gamma_max == 0:
            return x, sigma
        gamma = jnp.where((cfg.s_tmin <= sigma) & (sigma <= cfg.s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (gamma + 1)
        eps = jax.random.normal(key, x.shape) * cfg.s_noise
        return x + eps * jnp.sqrt(sigma_hat ** 2 - sigma ** 2), sigma_hat

    def step(x, inputs):
        sigma, next_sigma, key = inputs
        x, sigma_hat = churn(x, sigma, key)
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        dt = next_sigma - sigma_hat
        if cfg.order == 1:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, next_sigma)) / next_sigma
            x = x + (d + d_2) / 2 * dt
        return x, x if return_trajectory else None

    keys = jax.random.split(key_churn, n)
    x, visited = jax.lax.scan(step, x_start, (jnp.asarray(sigmas[:n - 1]), jnp.asarray(sigmas[1:n]), keys[:n - 1]))
    # The last step goes to sigma = 0, where both methods reduce to one Euler step: x + (x - D) / s * (0 - s)
    # is D itself. Returning D avoids the rounding that would move it off the 256-level grid.
    x, sigma_hat = churn(x, jnp.asarray(sigmas[n - 1]), keys[n - 1])
    out = denoise(x, sigma_hat)
    if not return_trajectory:
        return out
    return out, jnp.concatenate([x_start[None], visited, out[None]])


def sample_next_obs(denoiser, variables, key: jax.Array, obs: jax.Array, act: jax.Array, cfg: SamplerConfig,
                    x_start: Optional[jax.Array] = None, return_trajectory: bool = False,
                    null: Optional[jax.Array] = None, target: Optional[jax.Array] = None,
                    bucket: Optional[jax.Array] = None) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """The next frame [b, h, w, c] after past frames obs [b, t, h, w, c] and past actions act [b, t], guided by
    cfg.guidance_scale; x_start and return_trajectory as in `sample`. null: [b] bool, rows drawn on the null
    inputs (unconditionally, a model trained with condition_dropout > 0), with guidance_scale 0 only. target and
    bucket: the interpolation inputs of a denoiser trained with interpolation (models/interpolation.py), None for
    autoregressive generation."""
    b, _, h, w, c = obs.shape
    return sample(lambda x, sigma: denoiser.denoise(variables, x, sigma, obs, act, null,
                                                    guidance_scale=cfg.guidance_scale, target=target,
                                                    bucket=bucket),
                  key, (b, h, w, c), cfg, x_start, return_trajectory)
