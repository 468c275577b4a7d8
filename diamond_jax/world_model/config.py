"""Presets and validation of world-model configs (configs/world_model.py): every bad value fails before any
compute, naming the field and the fix; `check_dataset` holds a config against the dataset it trains on.

Plain Python at import, like diamond_jax.config: the config file is read before JAX may be imported.
"""

import dataclasses
import math
from typing import Any, Sequence, Tuple

from ml_collections import config_dict

from diamond_jax.config import ConfigError, check_channels, check_conditioning, fail
from diamond_jax.models.precision import PRECISIONS
from diamond_jax.models.sizes import cond_channels_for, num_heads

ACTION_KINDS = ("discrete", "multi_hot", "continuous")
SPACES = ("pixel", "latent")  # denoiser.space
CONFIG_FILE = "configs/world_model.py"


@dataclasses.dataclass(frozen=True)
class Presets:
    upsampler: bool = False
    debug: bool = False


def parse_presets(arg: str, names: Sequence[str]) -> Presets:
    """The comma-separated presets after ':' in --config=configs/world_model.py:upsampler,debug."""
    chosen = [s.strip() for s in (arg or "").split(",") if s.strip()]
    for item in chosen:
        if item not in names:
            raise ConfigError(f"Unknown config preset {item!r}. Presets are {', '.join(names)}, comma-separated, "
                              f"e.g. --config={CONFIG_FILE}:{','.join(names)}")
    return Presets(**{name: name in chosen for name in names})


def _size(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


def validate(c: config_dict.ConfigDict) -> None:
    if not isinstance(c.seed, int) or c.seed < 0:
        fail("seed", c.seed, "must be an integer >= 0", "pass e.g. --config.seed=3")
    if not isinstance(c.num_devices, int) or c.num_devices < 0:
        fail("num_devices", c.num_devices, "must be an integer >= 0", "use 0 for all local devices")
    if c.precision not in PRECISIONS:
        fail("precision", c.precision, f"must be one of {', '.join(PRECISIONS)}", "use float32 or bfloat16")
    if not _size(c.resolution):
        fail("resolution", c.resolution, "must be (height, width), two positive integers",
             "e.g. --config.resolution='(64, 64)'")
    if c.action_kind not in ACTION_KINDS:
        fail("action_kind", c.action_kind, f"must be one of {', '.join(ACTION_KINDS)}",
             "use the kind of the dataset's actions (python -m diamond_jax.dataset --info=DIR shows it)")
    if len(c.upsampler.resolution) and not _size(c.upsampler.resolution):
        fail("upsampler.resolution", c.upsampler.resolution, "must be () (the dataset's frame size) or "
             "(height, width)", "e.g. --config.upsampler.resolution='(210, 160)'")
    for name in ("denoiser", "upsampler"):
        _validate_model(c, name)
        _validate_sampler(c, f"{name}.sampler" if name == "upsampler" else "sampler")
    check_conditioning(c, "sampler")
    _validate_interpolation(c)
    _positive_int(c, "denoiser.training.num_autoregressive_steps", "training.num_steps", "training.log_every",
                  "training.test_every", "training.test_batches", "training.video_rows", "training.video_steps",
                  "checkpoint.every_steps", "checkpoint.keep")
    if not isinstance(c.checkpoint.every_minutes, (int, float)) or c.checkpoint.every_minutes < 0:
        fail("checkpoint.every_minutes", c.checkpoint.every_minutes, "must be a number >= 0", "use 0 to save "
             "only every checkpoint.every_steps updates")
    _validate_space(c)
    if c.upsampler.enabled and c.upsampler.inner_model.num_steps_conditioning < 1:
        fail("upsampler.inner_model.num_steps_conditioning", c.upsampler.inner_model.num_steps_conditioning,
             "must be >= 1: the upsampler sees the previous full-resolution frame(s)", "use 1 (CS:GO's)")


def _validate_space(c: config_dict.ConfigDict) -> None:
    if c.denoiser.space not in SPACES:
        fail("denoiser.space", c.denoiser.space, f"must be one of {', '.join(SPACES)}", "use pixel or latent")
    _positive_int(c, "autoencoder.encode_batch")
    s = c.autoencoder.sigma_data
    if not isinstance(s, (int, float)) or not (s >= 0 and math.isfinite(s)):
        fail("autoencoder.sigma_data", s, "must be a finite number >= 0", "use 0 to measure it on the encoded dataset")
    if c.denoiser.space != "latent":
        return
    if not c.autoencoder.path:
        fail("autoencoder.path", c.autoencoder.path, "must name an autoencoder for denoiser.space 'latent'",
             "pass --config.autoencoder.path=<the --workdir of python -m diamond_jax.autoencoder, or the --out of "
             "python -m diamond_jax.convert_vae>")
    if c.upsampler.enabled:
        fail("upsampler.enabled", True, "is not supported with denoiser.space 'latent' (the autoencoder's decoder "
             "draws the full frame)", "set --config.upsampler.enabled=False, or use denoiser.space pixel")
    ip = c.denoiser.get("interpolation")
    if ip is not None and ip.steps:
        # Drift detection and recovery (drift.py) compare and target frames in pixel space.
        fail("denoiser.interpolation.steps", ip.steps, "is not supported with denoiser.space 'latent' (drift "
             "detection and recovery work on pixel frames)", "set --config.denoiser.interpolation.steps=0, or use "
             "denoiser.space pixel")


def _get(c: config_dict.ConfigDict, field: str) -> Any:
    for part in field.split("."):
        c = c[part]
    return c


def _positive_int(c: config_dict.ConfigDict, *fields: str) -> None:
    for f in fields:
        v = _get(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            fail(f, v, "must be a positive integer", f"set --config.{f} to an integer >= 1")


def _positive(c: config_dict.ConfigDict, *fields: str) -> None:
    for f in fields:
        v = _get(c, f)
        if not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            fail(f, v, "must be a finite number > 0", f"set --config.{f} to a value > 0")


def _validate_model(c: config_dict.ConfigDict, name: str) -> None:
    m, im = c[name], c[name].inner_model
    _positive_int(c, f"{name}.inner_model.num_steps_conditioning", f"{name}.inner_model.cond_channels",
                  f"{name}.training.batch_size")
    _positive(c, f"{name}.sigma_data", f"{name}.sigma_distribution.scale", f"{name}.sigma_distribution.sigma_min",
              f"{name}.sigma_distribution.sigma_max", f"{name}.optimizer.lr", f"{name}.optimizer.eps",
              f"{name}.training.max_grad_norm")
    if not m.sigma_distribution.sigma_min < m.sigma_distribution.sigma_max:
        fail(f"{name}.sigma_distribution.sigma_min", m.sigma_distribution.sigma_min,
             f"must be < sigma_max ({m.sigma_distribution.sigma_max})", "swap or change the two values")
    n = im.num_steps_conditioning
    per_action = n if name == "denoiser" else 1  # the upsampler has no actions
    if im.cond_channels % 2 or im.cond_channels % per_action:
        fail(f"{name}.inner_model.cond_channels", im.cond_channels, "must be even (Fourier features)"
             + (f" and divisible by num_steps_conditioning ({n}, one action embedding each)"
                if name == "denoiser" else ""), f"use e.g. {cond_channels_for(im.cond_channels, per_action)}")
    if not (len(im.depths) == len(im.channels) == len(im.attn_depths)) or not im.depths:
        fail(f"{name}.inner_model.depths", im.depths, "depths, channels and attn_depths need one entry per "
             "level, same length", "give the three the same length")
    for i, d in enumerate(im.depths):
        if not isinstance(d, int) or d < 1:
            fail(f"{name}.inner_model.depths[{i}]", d, "must be a positive integer", "use e.g. 2")
    for i, ch in enumerate(im.channels):
        check_channels(f"{name}.inner_model.channels[{i}]", ch)
        if (im.attn_depths[i] or i == len(im.channels) - 1) and ch % num_heads(ch):
            fail(f"{name}.inner_model.channels[{i}]", ch, "must be divisible by its attention heads of 8 channels",
                 "use a multiple of 8")


def _validate_interpolation(c: config_dict.ConfigDict) -> None:
    """denoiser.interpolation (configs saved before it existed lack it: no interpolation)."""
    ip = c.denoiser.get("interpolation")
    if ip is None:
        return
    if not isinstance(ip.steps, int) or isinstance(ip.steps, bool) or ip.steps < 0:
        fail("denoiser.interpolation.steps", ip.steps, "must be an integer >= 0", "use 0 (off) or e.g. 10 (the "
             "paper's)")
    if not ip.steps:
        return
    p = ip.p_interpolate
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
        fail("denoiser.interpolation.p_interpolate", p, "must be a probability in [0, 1]", "use e.g. 0.25 (the "
             "paper's)")
    for name in ("motion_weighting", "intermediate_targets"):
        if not isinstance(ip[name], bool):
            fail(f"denoiser.interpolation.{name}", ip[name], "must be True or False", f"set "
                 f"--config.denoiser.interpolation.{name}=True or False")
    _positive(c, "denoiser.interpolation.motion_floor", "denoiser.interpolation.intermediate_power")
    ar = c.denoiser.training.num_autoregressive_steps
    if isinstance(ar, int) and ar > ip.steps:
        fail("denoiser.training.num_autoregressive_steps", ar, f"must be <= denoiser.interpolation.steps "
             f"({ip.steps}): the predicted frames of a segment lie inside its interpolation", "lower it, or raise "
             "the interpolation steps")


def _validate_sampler(c: config_dict.ConfigDict, field: str) -> None:
    s = _get(c, field)
    _positive_int(c, f"{field}.num_steps_denoising")
    _positive(c, f"{field}.sigma_min", f"{field}.sigma_max", f"{field}.rho")
    if not s.sigma_min < s.sigma_max:
        fail(f"{field}.sigma_min", s.sigma_min, f"must be < sigma_max ({s.sigma_max})", "swap or change the two")
    if s.order not in (1, 2):
        fail(f"{field}.order", s.order, "must be 1 (Euler) or 2 (Heun)", "set 1 or 2")


def denoiser_segment_length(c: config_dict.ConfigDict) -> int:
    """Frames per denoiser training segment: the context and the predicted frames, or with interpolation the
    context and the m frames up to the target."""
    n = c.denoiser.inner_model.num_steps_conditioning
    steps = c.denoiser.get("interpolation", {}).get("steps", 0)
    return n + (steps if steps else c.denoiser.training.num_autoregressive_steps)


def full_resolution(c: config_dict.ConfigDict, frame_shape: Tuple[int, int]) -> Tuple[int, int]:
    """The upsampler's (height, width): its field, or the dataset's frame size."""
    return tuple(c.upsampler.resolution) if len(c.upsampler.resolution) else tuple(frame_shape)


def check_dataset(c: config_dict.ConfigDict, action_kind: str, frame_shape: Tuple[int, int],
                  max_episode_length: int, path: str) -> None:
    """Raises ConfigError when the config cannot train on a dataset of these actions and frames."""
    if c.action_kind != action_kind:
        raise ConfigError(f"config.action_kind={c.action_kind!r} but the dataset {path} has {action_kind} actions. "
                          f"Fix: --config.action_kind={action_kind}")
    needed = {"denoiser": denoiser_segment_length(c)}
    if c.upsampler.enabled:
        needed["upsampler"] = c.upsampler.inner_model.num_steps_conditioning + 1
    for name, length in needed.items():
        if max_episode_length < length:
            raise ConfigError(f"the {name} trains on segments of {length} frames, but the longest episode of "
                              f"{path} has {max_episode_length}. Fix: lower "
                              f"config.{name}.inner_model.num_steps_conditioning, or record longer episodes.")
    if c.upsampler.enabled:
        low, full = tuple(c.resolution), full_resolution(c, frame_shape)
        if low[0] > full[0] or low[1] > full[1]:
            raise ConfigError(f"config.resolution={low} is larger than the upsampler's {full}. Fix: lower "
                              "--config.resolution, or set --config.upsampler.resolution.")
