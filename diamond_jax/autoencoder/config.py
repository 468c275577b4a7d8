"""Presets and validation of autoencoder configs (configs/autoencoder.py): every bad value fails before any
compute, naming the field and the fix. Plain Python at import: the config file is read before JAX starts."""

import dataclasses
import math
from typing import Any, Sequence

from ml_collections import config_dict

from diamond_jax.config import ConfigError, fail

CONFIG_FILE = "configs/autoencoder.py"
PIXEL_LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class Presets:
    debug: bool = False


def parse_presets(arg: str, names: Sequence[str]) -> Presets:
    chosen = [s.strip() for s in (arg or "").split(",") if s.strip()]
    for item in chosen:
        if item not in names:
            raise ConfigError(f"Unknown config preset {item!r}. Presets are {', '.join(names)}, e.g. "
                              f"--config={CONFIG_FILE}:{names[0]}")
    return Presets(**{name: name in chosen for name in names})


def _get(c: config_dict.ConfigDict, field: str) -> Any:
    for part in field.split("."):
        c = c[part]
    return c


def _int_at_least(c, low: int, *fields: str) -> None:
    for f in fields:
        v = _get(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            fail(f, v, f"must be an integer >= {low}", f"set --config.{f} to an integer >= {low}")


def _number_at_least(c, low: float, strict: bool, *fields: str) -> None:
    for f in fields:
        v = _get(c, f)
        ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > low if strict else v >= low)
        if not ok:
            fail(f, v, f"must be a finite number {'>' if strict else '>='} {low}", f"set --config.{f}")


def validate(c: config_dict.ConfigDict) -> None:
    _int_at_least(c, 0, "seed", "num_devices", "training.lr_warmup_steps")
    _int_at_least(c, 1, "model.layers_per_block", "model.latent_channels", "model.norm_num_groups",
                  "training.batch_size", "training.num_steps", "training.log_every", "training.test_every",
                  "training.test_frames", "training.scaling_frames", "checkpoint.every_steps", "checkpoint.keep")
    _number_at_least(c, 0, True, "optimizer.lr", "optimizer.eps", "training.max_grad_norm")
    _number_at_least(c, 0, False, "optimizer.weight_decay", "loss.kl_weight", "loss.lpips_weight",
                     "model.scaling_factor", "checkpoint.every_minutes")
    channels = tuple(c.model.block_out_channels)
    if not channels or not all(isinstance(ch, int) and ch >= 1 for ch in channels):
        fail("model.block_out_channels", channels, "must be one or more positive integers", "e.g. (32, 64, 64)")
    for i, ch in enumerate(channels):
        if ch % c.model.norm_num_groups:
            fail(f"model.block_out_channels[{i}]", ch, f"must be divisible by model.norm_num_groups "
                 f"({c.model.norm_num_groups})", "change one of the two")
    res = tuple(c.resolution)
    if len(res) != 2 or not all(isinstance(v, int) and v >= 1 for v in res):
        fail("resolution", res, "must be (height, width), two positive integers", "e.g. --config.resolution='(128, 128)'")
    factor = 2 ** (len(channels) - 1)
    if res[0] % factor or res[1] % factor:
        fail("resolution", res, f"must be divisible by the downsampling factor {factor} (2^(len(block_out_channels) "
             "- 1))", f"use multiples of {factor}")
    if c.loss.pixel not in PIXEL_LOSSES:
        fail("loss.pixel", c.loss.pixel, f"must be one of {', '.join(PIXEL_LOSSES)}", "use l1")
