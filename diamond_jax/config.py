"""Config presets and validation: every bad value fails before any compute, naming the field and the fix."""

import dataclasses
import math
from typing import Any, Optional, Sequence

from ml_collections import config_dict

from diamond_jax.models.conditioning import CONDITION_DROPOUT_TARGETS, CONDITIONINGS
from diamond_jax.models.precision import DEFAULT_PRECISION, PRECISIONS
from diamond_jax.models.sizes import ATTN_HEAD_DIM, GN_GROUP_SIZE, cond_channels_for, num_groups, num_heads

# How a compiled training call loops over its updates (training.phases.use_scan).
PHASE_LOOPS = ("auto", "scan", "python")
# How a seed group trains its seeds (training.group.use_vmap).
SEED_LOOPS = ("auto", "vmap", "sequential")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Presets:
    game: Optional[str] = None
    debug: bool = False


CPU_DEVICES_HELP = (
    "CPU only: split the CPU into this many JAX devices, batches running data-parallel over them. XLA's CPU "
    "backend runs each convolution on one core, so on a 2-core machine 2 devices make the paper-size denoiser "
    "updates and imagination 1.5-2.2x faster. Results depend on the device count (the order of float sums), so "
    "by default JAX's own setting is kept: one device, unless XLA_FLAGS sets "
    "--xla_force_host_platform_device_count.")


def parse_presets(arg: str, games: Sequence[str], config_file: str = "configs/atari100k.py",
                  kind: str = "an Atari 100k game") -> Presets:
    """Parses the text after ':' in `--config=configs/atari100k.py:game=Pong,debug`; `games` are the names a
    `game=` preset may take (the config file's environment backend's), `kind` says what they are."""
    game, debug = None, False
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key == "game" and value:
            game = value
        elif item == "debug":
            debug = True
        else:
            raise ConfigError(
                f"Unknown config preset {item!r}. Presets are 'game=<Name>' and 'debug', comma-separated, "
                f"e.g. --config={config_file}:game={games[-1]},debug"
            )
    if game is not None and game not in games:
        raise ConfigError(
            f"preset game={game!r} is not {kind}. Fix: use one of {', '.join(games)} "
            f"(names are case-sensitive), e.g. --config={config_file}:game={games[-1]}"
        )
    return Presets(game=game, debug=debug)


def fail(field: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {problem}. Fix: {fix}.")


def _get(c: config_dict.ConfigDict, field: str) -> Any:
    value = c
    for part in field.split("."):
        value = value[part]
    return value


def validate(c: config_dict.ConfigDict) -> None:
    """Raises ConfigError on the first impossible value of a config built by a file of configs/. The game and
    the frame size its environment can draw are the environments' to check (`envs.check_env_config`)."""

    def positive_int(*fields: str) -> None:
        for f in fields:
            v = _get(c, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f, v, "must be a positive integer", f"set --config.{f} to an integer >= 1")

    def non_negative(*fields: str) -> None:
        for f in fields:
            v = _get(c, f)
            if not isinstance(v, (int, float)) or not v >= 0:
                fail(f, v, "must be a number >= 0", f"set --config.{f} to a value >= 0")

    def strictly_positive(*fields: str) -> None:
        for f in fields:
            v = _get(c, f)
            if not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                fail(f, v, "must be a finite number > 0", f"set --config.{f} to a value > 0")

    def probability(*fields: str) -> None:
        for f in fields:
            v = _get(c, f)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                fail(f, v, "must lie in [0, 1]", f"set --config.{f} to a value between 0 and 1")

    if not isinstance(c.seed, int) or c.seed < 0:
        fail("seed", c.seed, "must be an integer >= 0", "pass e.g. --config.seed=3")
    seeds = c.get("seeds", ())
    if not isinstance(seeds, tuple) or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in seeds) \
            or len(set(seeds)) < len(seeds):
        fail("seeds", seeds, "must be distinct integers >= 0", "pass e.g. --config.seeds=0,1,2 (or () for one run)")
    if seeds and c.denoiser.get("space", "pixel") == "latent":
        fail("seeds", seeds, "cannot group the seeds of a latent agent (its sigma_data and denoiser phase are per run)",
             "run the seeds as separate processes, one --config.seed each")
    if not isinstance(c.num_devices, int) or c.num_devices < 0:
        fail("num_devices", c.num_devices, "must be an integer >= 0", "use 0 for all local devices")
    precision = c.get("precision", DEFAULT_PRECISION)  # absent from configs saved before it existed
    if precision not in PRECISIONS:
        fail("precision", precision, f"must be one of {', '.join(PRECISIONS)}",
              "use float32 (the paper's) or bfloat16 (matrix products and convolutions in bfloat16)")

    # Environment (the Atari fields only for envpool; the game itself is checked by envs.check_env_config).
    positive_int("env.size", "env.max_episode_steps")
    probability("env.repeat_action_probability")
    if c.env.get("backend", "envpool") == "envpool":
        positive_int("env.frame_skip")
        if c.env.life_loss_rule not in ("official", "every_decrease"):
            fail("env.life_loss_rule", c.env.life_loss_rule, "must be official or every_decrease",
                  "use official (the official wrapper's rule)")
        if not isinstance(c.env.noop_max, int) or c.env.noop_max < 1:
            fail("env.noop_max", c.env.noop_max, "must be an integer >= 1 (envpool always plays 1 to noop_max "
                  "no-ops at reset and crashes with 0)", "use 30 (the paper) or 1 for a single no-op")

    # Collection and schedule.
    t = c.collection.train
    positive_int("collection.train.num_envs", "collection.train.num_steps_total",
                 "collection.train.steps_per_epoch", "collection.train.first_epoch.min",
                 "collection.train.first_epoch.max", "collection.test.num_envs",
                 "collection.test.num_episodes", "collection.test.num_final_episodes", "evaluation.every",
                 "checkpoint.every_epochs", "checkpoint.keep")
    positive_int("training.steps_per_call", "world_model_env.initial_conditions_per_row")
    if c.training.get("seed_loop", "auto") not in SEED_LOOPS:
        fail("training.seed_loop", c.training.seed_loop, f"must be one of {', '.join(SEED_LOOPS)}",
             "use auto (vmap on GPU/TPU, one seed after another on CPU)")
    if c.training.phase_loop not in PHASE_LOOPS:
        fail("training.phase_loop", c.training.phase_loop, f"must be one of {', '.join(PHASE_LOOPS)}",
              "use auto (scan on GPU/TPU, one update per call on CPU)")
    non_negative("collection.train.first_epoch.threshold_rew", "training.num_final_epochs",
                 "checkpoint.every_minutes")
    probability("collection.train.epsilon", "collection.test.epsilon")
    non_negative("collection.test.temperature")
    if not t.first_epoch.min <= t.first_epoch.max <= t.num_steps_total:
        fail("collection.train.first_epoch", (t.first_epoch.min, t.first_epoch.max),
              f"needs min <= max <= num_steps_total ({t.num_steps_total})",
              "lower first_epoch.min/max or raise collection.train.num_steps_total")
    for f in ("num_steps_total", "first_epoch.min", "first_epoch.max"):
        if _get(t, f) % t.steps_per_epoch:
            fail(f"collection.train.{f}", _get(t, f),
                  f"must be a multiple of collection.train.steps_per_epoch ({t.steps_per_epoch}) so that "
                  "collection ends exactly at the budget", "round it to a multiple")
    if t.steps_per_epoch % t.num_envs:
        fail("collection.train.steps_per_epoch", t.steps_per_epoch,
              f"must be a multiple of collection.train.num_envs ({t.num_envs}): each env step adds one "
              "agent step per env", "change either value")

    # Denoiser.
    strictly_positive("denoiser.sigma_data", "denoiser.sigma_distribution.scale",
                      "denoiser.sigma_distribution.sigma_min", "denoiser.sigma_distribution.sigma_max")
    non_negative("denoiser.sigma_offset_noise")
    sd = c.denoiser.sigma_distribution
    if not sd.sigma_min < sd.sigma_max:
        fail("denoiser.sigma_distribution.sigma_min", sd.sigma_min,
              f"must be < sigma_max ({sd.sigma_max})", "swap or change the two values")
    space = c.denoiser.get("space", "pixel")  # configs saved before the field are pixel space
    if space not in ("pixel", "latent"):
        fail("denoiser.space", space, "must be 'pixel' or 'latent'", "use pixel (the paper) or latent")
    if space == "latent":
        ae = c.get("autoencoder")
        if ae is None or not ae.path:
            fail("autoencoder.path", None if ae is None else ae.path, "must name an autoencoder for denoiser.space "
                 "'latent'", "pass --config.autoencoder.path=<the --workdir of python -m diamond_jax.autoencoder, "
                 "or the --out of python -m diamond_jax.convert_vae>")
        positive_int("autoencoder.encode_batch")
        if not isinstance(ae.sigma_data, (int, float)) or not (ae.sigma_data >= 0 and math.isfinite(ae.sigma_data)):
            fail("autoencoder.sigma_data", ae.sigma_data, "must be a finite number >= 0",
                 "use 0 to measure it on the encoded replay")
    im = c.denoiser.inner_model
    positive_int("denoiser.inner_model.num_steps_conditioning", "denoiser.inner_model.cond_channels",
                 "denoiser.training.num_autoregressive_steps")
    if im.cond_channels % 2 or im.cond_channels % im.num_steps_conditioning:
        fail("denoiser.inner_model.cond_channels", im.cond_channels,
              f"must be even (Fourier features) and divisible by num_steps_conditioning "
              f"({im.num_steps_conditioning}, one action embedding each)",
             f"use e.g. {cond_channels_for(im.cond_channels, im.num_steps_conditioning)}")
    _check_levels(c, "denoiser.inner_model", im.depths, im.channels, im.attn_depths)
    check_conditioning(c, "world_model_env.sampler")
    _check_levels(c, "rew_end_model", c.rew_end_model.depths, c.rew_end_model.channels,
                  c.rew_end_model.attn_depths)
    positive_int("rew_end_model.lstm_dim", "rew_end_model.cond_channels", "rew_end_model.training.seq_length")
    if c.rew_end_model.training.seq_length < 2:
        fail("rew_end_model.training.seq_length", c.rew_end_model.training.seq_length,
              "needs at least 2 frames (one transition)", "use horizon + num_steps_conditioning")

    # Actor-critic.
    ac = c.actor_critic
    positive_int("actor_critic.lstm_dim")
    if len(ac.channels) != len(ac.down) or not ac.channels:
        fail("actor_critic.channels", ac.channels, f"needs one entry per entry of actor_critic.down ({ac.down})",
              "give both the same length")
    for i, ch in enumerate(ac.channels):
        check_channels(f"actor_critic.channels[{i}]", ch)
    if c.env.size % 2 ** sum(map(bool, ac.down)):
        fail("env.size", c.env.size, f"must be divisible by 2^{sum(map(bool, ac.down))} (the actor-critic's "
              "max-pools)", "use 64 or change actor_critic.down")
    for f in ("gamma", "lambda_"):
        probability(f"actor_critic.loss.{f}")
    non_negative("actor_critic.loss.weight_value_loss", "actor_critic.loss.weight_entropy_loss")

    # Optimisation, shared by the three models.
    for name in ("denoiser", "rew_end_model", "actor_critic"):
        positive_int(f"{name}.training.steps_first_epoch", f"{name}.training.batch_size")
        non_negative(f"{name}.training.steps_per_epoch", f"{name}.training.lr_warmup_steps",
                     f"{name}.optimizer.weight_decay")
        strictly_positive(f"{name}.training.max_grad_norm", f"{name}.optimizer.lr", f"{name}.optimizer.eps")
        w = c[name].training.sample_weights
        if (not w or any(not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in w)
                or abs(sum(w) - 1) > 1e-6):
            fail(f"{name}.training.sample_weights", w, "must be weights in [0, 1] summing to 1",
                  "e.g. (0.1, 0.1, 0.1, 0.7)")

    # World model as an environment and its sampler.
    positive_int("world_model_env.horizon", "world_model_env.sampler.num_steps_denoising")
    s = c.world_model_env.sampler
    strictly_positive("world_model_env.sampler.sigma_min", "world_model_env.sampler.sigma_max",
                      "world_model_env.sampler.rho")
    if not s.sigma_min < s.sigma_max:
        fail("world_model_env.sampler.sigma_min", s.sigma_min, f"must be < sigma_max ({s.sigma_max})",
              "swap or change the two values")
    if s.order not in (1, 2):
        fail("world_model_env.sampler.order", s.order, "must be 1 (Euler) or 2 (Heun)", "set 1 or 2")
    non_negative("world_model_env.sampler.s_churn", "world_model_env.sampler.s_noise",
                 "world_model_env.sampler.s_tmin")
    if not s.s_tmin <= s.s_tmax:
        fail("world_model_env.sampler.s_tmin", s.s_tmin, f"must be <= s_tmax ({s.s_tmax})",
              "lower s_tmin or raise s_tmax (inf = no upper bound)")


def check_conditioning(c: config_dict.ConfigDict, sampler_field: str) -> None:
    """The denoiser's conditioning variant (config.denoiser) and the guidance of its sampler (`sampler_field`).
    Configs saved before these fields existed lack them: they are frame-stack models without guidance."""
    d = c.denoiser
    conditioning = d.get("conditioning", "frame_stack")
    if conditioning not in CONDITIONINGS:
        fail("denoiser.conditioning", conditioning, f"must be one of {', '.join(CONDITIONINGS)}",
             "use frame_stack (the paper's main model) or cross_attention")
    dropout = d.get("condition_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        fail("denoiser.condition_dropout", dropout, "must be a probability in [0, 1) (1 would never train the "
             "conditional model)", "use 0 (no masking) or e.g. 0.2 (the paper's)")
    target = d.get("condition_dropout_target", "all")
    if target not in CONDITION_DROPOUT_TARGETS:
        fail("denoiser.condition_dropout_target", target, f"must be one of {', '.join(CONDITION_DROPOUT_TARGETS)}",
             "use all (past frames and actions, the paper's) or actions")
    if conditioning == "cross_attention":
        ca, channels = d.cross_attention, tuple(d.inner_model.channels)
        levels = tuple(ca.levels)
        if (not levels or len(set(levels)) != len(levels)
                or any(not isinstance(i, int) or not 0 <= i < len(channels) for i in levels)):
            fail("denoiser.cross_attention.levels", ca.levels, f"must name distinct U-Net levels, integers in "
                 f"[0, {len(channels)}) (denoiser.inner_model.channels has {len(channels)})", "e.g. (0, 1)")
        if len(ca.channels) != len(channels):
            fail("denoiser.cross_attention.channels", ca.channels, f"needs one entry per U-Net level "
                 f"({len(channels)}, as denoiser.inner_model.channels)", "give it the same length")
        for i, ch in enumerate(ca.channels[:max(levels) + 1]):
            check_channels(f"denoiser.cross_attention.channels[{i}]", ch)
        if not isinstance(ca.heads, int) or isinstance(ca.heads, bool) or ca.heads < 1:
            fail("denoiser.cross_attention.heads", ca.heads, "must be a positive integer", "use e.g. 4")
        for i in levels:
            if channels[i] % ca.heads:
                fail("denoiser.cross_attention.heads", ca.heads, f"must divide the {channels[i]} channels of "
                     f"U-Net level {i}, which cross-attends", "use a divisor of those channels")
    s = _get(c, sampler_field)
    w = s.get("guidance_scale", 0.0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not (w >= 0 and math.isfinite(w)):
        fail(f"{sampler_field}.guidance_scale", w, "must be a finite number >= 0", "use 0 (no guidance) or e.g. 1")
    if w > 0 and dropout == 0:
        fail(f"{sampler_field}.guidance_scale", w, "classifier-free guidance needs a denoiser trained with masked "
             "conditioning (denoiser.condition_dropout > 0); this one has no null inputs to guide against",
             "train with --config.denoiser.condition_dropout=0.2 (the paper's), or sample with guidance_scale 0")


def check_channels(field: str, ch: Any) -> None:
    if not isinstance(ch, int) or ch < 1:
        fail(field, ch, "must be a positive integer", "use e.g. 32 or 64")
    groups = num_groups(ch)
    if ch % groups:
        fail(field, ch, f"must be divisible by its {groups} GroupNorm groups (groups of {GN_GROUP_SIZE} channels)",
              f"use a multiple of {GN_GROUP_SIZE}, or fewer than {2 * GN_GROUP_SIZE} channels")


def _check_levels(c: config_dict.ConfigDict, prefix: str, depths, channels, attn_depths) -> None:
    if not (len(depths) == len(channels) == len(attn_depths)) or not depths:
        fail(f"{prefix}.depths", depths, f"depths, channels {tuple(channels)} and attn_depths "
              f"{tuple(attn_depths)} need one entry per level, same length", "give the three the same length")
    for i, d in enumerate(depths):
        if not isinstance(d, int) or d < 1:
            fail(f"{prefix}.depths[{i}]", d, "must be a positive integer", "use e.g. 2")
    for i, ch in enumerate(channels):
        check_channels(f"{prefix}.channels[{i}]", ch)
        heads = num_heads(ch)
        has_attention = attn_depths[i] or i == len(channels) - 1  # the middle blocks always attend
        if has_attention and ch % heads:
            fail(f"{prefix}.channels[{i}]", ch, f"must be divisible by its {heads} attention heads of "
                  f"{ATTN_HEAD_DIM} channels", f"use a multiple of {ATTN_HEAD_DIM}")
    factor = 2 ** (len(channels) - 1)
    if c.env.size % factor:
        fail("env.size", c.env.size, f"must be divisible by 2^{len(channels) - 1} = {factor} ({prefix} has "
              f"{len(channels)} levels)", "use 64 or fewer levels")
