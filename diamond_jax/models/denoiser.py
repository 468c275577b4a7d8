"""The EDM denoiser D(x, sigma | past frames, past actions) of DIAMOND.

D = c_skip * x + c_out * F(c_in * x, c_noise, obs / sigma_data, act), F the U-Net below. Frames are NHWC
in [-1, 1], of any height and width; a batch of past frames is [b, t, h, w, c] and enters F stacked on the
channel axis.

Actions (`action_kind`): "discrete" indices [b, t] through an embedding table, as the paper; "multi_hot"
(several keys held at once) and "continuous" vectors [b, t, size] through a learned linear map without bias,
which for a one-hot vector is the same table lookup (the official CS:GO model embeds its multi-hot keys so).
"none" (num_actions 0): no action input, as the upsampler (models/upsampler.py).

Conditioning variants (the paper's section 4.2, README "Conditioning variants"):
- `conditioning`: "frame_stack" (the paper's main model and the official release's) concatenates the past
  frames with the noised frame on the channel axis; "cross_attention" gives the core U-Net the noised frame
  only, and lets chosen levels of it cross-attend to the activations of a light history encoder that sees each
  past frame apart (parameters shared over the frames, a learned embedding of how many steps back each is, and
  the action taken at it).
- `condition_dropout` p > 0 (masked conditioning): in training each row, with probability p, has its past
  frames and actions (`condition_dropout_target` "all", as the paper) or its actions only ("actions")
  replaced by learned null inputs; such a model can then run unconditionally (`null`) and be sampled with
  classifier-free guidance (equation 4: `guidance_scale` of `denoise`). With p = 0 there are no null inputs
  and the model is the frame-stack denoiser of the official release.

Interpolation (models/interpolation.py, README "Long rollouts"): `interpolation` set, the U-Net also sees a
target frame (stacked with the noised frame) and one of m + 1 bucket embeddings (interpolation step or none),
and trains both to predict and to interpolate toward the target. None (the default): no such inputs, and the
model computes exactly what it computes without them.
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn

from diamond_jax.data.batch import Batch
from diamond_jax.models.blocks import (Conv, Dense, Downsample, Dtype, FourierFeatures, GroupNorm, ResBlocks, UNet,
                                      init_key)
from diamond_jax.models import interpolation as interp
from diamond_jax.models.conditioning import CONDITION_DROPOUT_TARGETS, CONDITIONINGS
from diamond_jax.models.precision import compute_dtype

IMG_CHANNELS = 3
Variables = Dict[str, Any]  # {"params": ..., "buffers": ...}
ACTION_KINDS = ("discrete", "multi_hot", "continuous", "none")


@dataclasses.dataclass(frozen=True)
class CrossAttention:
    """The cross-attention variant's sizes."""

    levels: Tuple[int, ...]  # levels of the core U-Net (0 = full resolution) whose blocks cross-attend
    heads: int  # attention heads of each cross-attention block
    channels: Tuple[int, ...]  # the history encoder's channels at levels 0..max(levels)


def action_embedding(num_actions: int, action_kind: str, width: int, act: jax.Array) -> jax.Array:
    """[..., width] per action of act ([...] indices or [..., num_actions] vectors), inside a compact module:
    a table for discrete actions, a linear map without bias for vectors (named as the official modules)."""
    if action_kind == "discrete":
        return nn.Embed(num_actions, width, embedding_init=nn.initializers.normal(1.0), name="act_emb_0")(act)
    # float32 whatever the compute dtype: it is added to the noise level's float32 Fourier features.
    return Dense(width, use_bias=False, name="act_proj")(act.astype(jnp.float32))


def unstack_frames(x: jax.Array, n: int) -> jax.Array:
    """[b, h, w, n * c] -> [b, n, h, w, c], the inverse of stack_frames."""
    b, h, w, nc = x.shape
    return x.reshape(b, h, w, n, nc // n).transpose(0, 3, 1, 2, 4)


class HistoryEncoder(nn.Module):
    """The cross-attention variant's history encoder: a light U-Net encoder (one AdaGroupNorm ResBlock per level,
    downsampling like the core U-Net) run on each past frame apart, with the same parameters for every frame.
    Its conditioning is a learned embedding of how many steps before the current frame the frame is, plus the
    embedding of the action taken at it. Returns, per level, the activations of all frames as tokens
    [b, n * h_i * w_i, channels[i]] for the core U-Net to cross-attend to."""

    num_actions: int
    action_kind: str
    cond_channels: int
    channels: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array, null: Optional[jax.Array]) -> Tuple[jax.Array, ...]:
        """obs: [b, n, h, w, 3]; act: [b, n(, size)]; null: [b] rows whose actions are replaced by the learned
        null action, or None for a model without null inputs."""
        b, n, h, w, _ = obs.shape
        dt, width = self.dtype, self.cond_channels
        # Row k of the table is for the frame k steps before the current one (obs[:, -1] is 0 steps before).
        cond = nn.Embed(n, width, embedding_init=nn.initializers.normal(1.0), name="time_emb")(jnp.arange(n)[::-1])
        if self.action_kind != "none":
            act_emb = action_embedding(self.num_actions, self.action_kind, width, act)
            if null is not None:
                act_emb = jnp.where(null[:, None, None], self.param("null_act_emb", nn.initializers.zeros, (width,)),
                                    act_emb)
            cond = cond + act_emb
        cond = jnp.broadcast_to(cond, (b, n, width)).reshape(b * n, width)
        cond = Dense(width, dtype=dt, name="cond_proj_2")(nn.silu(Dense(width, dtype=dt, name="cond_proj_0")(cond)))
        x = Conv(self.channels[0], dtype=dt, name="conv_in")(obs.reshape((b * n,) + obs.shape[2:]))
        tokens = []
        for i, ch in enumerate(self.channels):
            x = Downsample(dt, name=f"downsamples_{i}")(x) if i > 0 else x
            x, _ = ResBlocks([ch], False, dt, name=f"blocks_{i}")(x, cond)
            features = GroupNorm(dt, name=f"norm_out_{i}")(x)
            tokens.append(features.reshape(b, n * features.shape[1] * features.shape[2], ch))
        return tuple(tokens)


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """Pads frames [b, h, w, c] at the bottom and right, repeating the edge, to a height and width that the
    U-Net's `multiple` (2^downsamplings) divides; a no-op for sizes it divides (every RL config's)."""
    ph, pw = -x.shape[1] % multiple, -x.shape[2] % multiple
    if not (ph or pw):
        return x
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


class InnerModel(nn.Module):
    """F: a U-Net conditioned on the noise level and the past actions through every AdaGroupNorm, and on the past
    frames by frame stacking or by cross-attention to a history encoder (`conditioning`). Computes in `dtype`
    (models/precision.py) and returns float32.

    null_target None: no null inputs (the official model). "all" / "actions": learned null inputs exist, and
    the rows that `null` sets see them in place of their past frames and actions / of their actions only.
    """

    num_actions: int  # discrete: the number of actions; multi_hot, continuous: the vector's size; none: 0
    num_steps_conditioning: int
    cond_channels: int
    depths: Sequence[int]
    channels: Sequence[int]
    attn_depths: Sequence[int]
    dtype: Dtype = jnp.float32
    action_kind: str = "discrete"
    conditioning: str = "frame_stack"  # one of CONDITIONINGS
    cross_attention: Optional[CrossAttention] = None  # with conditioning "cross_attention"
    null_target: Optional[str] = None  # None or one of CONDITION_DROPOUT_TARGETS
    interpolation_buckets: int = 0  # m + 1 bucket embeddings and a target-frame input; 0: neither
    img_channels: int = IMG_CHANNELS  # channels of a frame: RGB, or a latent world model's latent channels

    def action_embedding(self, act: jax.Array) -> jax.Array:
        """[b, cond_channels]: one embedding of cond_channels / n per past action, concatenated (0 without
        actions)."""
        b, n, width = act.shape[0], self.num_steps_conditioning, self.cond_channels // self.num_steps_conditioning
        if self.action_kind == "none":
            return jnp.zeros((b, self.cond_channels), jnp.float32)
        chex.assert_shape(act, (b, n) if self.action_kind == "discrete" else (b, n, self.num_actions))
        return action_embedding(self.num_actions, self.action_kind, width, act).reshape(b, -1)

    @nn.compact
    def __call__(self, noisy_next_obs: jax.Array, c_noise: jax.Array, obs: jax.Array, act: jax.Array,
                 null: Optional[jax.Array] = None, target: Optional[jax.Array] = None,
                 bucket: Optional[jax.Array] = None) -> jax.Array:
        """obs: the past frames stacked [b, h, w, n * 3] (stack_frames); null: [b] bool, the rows to run on the
        null inputs (None: none), only for a model with null inputs; target [b, h, w, 3] and bucket int [b]:
        the interpolation inputs, for a model with interpolation buckets only (and then both given)."""
        b, h, w, _ = noisy_next_obs.shape
        n = self.num_steps_conditioning
        chex.assert_shape(noisy_next_obs, (b, None, None, self.img_channels))
        chex.assert_shape(obs, (b, h, w, n * self.img_channels))
        act_emb = self.action_embedding(act)
        if self.null_target is not None:
            null = jnp.zeros((b,), bool) if null is None else null
            chex.assert_shape(null, (b,))
            # The null inputs start as no action and mid-grey frames, and are learned.
            act_emb = jnp.where(null[:, None], self.param("null_act_emb", nn.initializers.zeros,
                                                          (self.cond_channels,)), act_emb)
            if self.null_target == "all":
                obs = jnp.where(null[:, None, None, None],
                                self.param("null_obs", nn.initializers.zeros, (n * self.img_channels,)), obs)
        elif null is not None:
            raise ValueError("this denoiser has no null inputs to run rows unconditionally: build it with "
                             "condition_dropout > 0 (and train it so)")
        noise_emb = FourierFeatures(self.cond_channels, name="noise_emb")(jnp.broadcast_to(c_noise, (b,)))
        dt = self.dtype
        cond = noise_emb + act_emb
        if self.interpolation_buckets:
            chex.assert_shape(target, (b, h, w, IMG_CHANNELS))
            chex.assert_shape(bucket, (b,))
            cond = cond + nn.Embed(self.interpolation_buckets, self.cond_channels,
                                   embedding_init=nn.initializers.normal(1.0), name="interp_emb")(bucket)
            # The target enters beside the noised frame, in both conditionings.
            noisy_next_obs = jnp.concatenate([target, noisy_next_obs], axis=-1)
        elif target is not None or bucket is not None:
            raise ValueError("this denoiser has no interpolation inputs: build it with an interpolation (and train "
                             "it so) to give it a target frame")
        cond = Dense(self.cond_channels, dtype=dt, name="cond_proj_0")(cond)
        cond = Dense(self.cond_channels, dtype=dt, name="cond_proj_2")(nn.silu(cond))
        multiple = 2 ** (len(self.channels) - 1)
        if self.conditioning == "frame_stack":
            x = pad_to_multiple(jnp.concatenate([obs, noisy_next_obs], axis=-1), multiple)
            x = Conv(self.channels[0], dtype=dt, name="conv_in")(x)
            x = UNet(self.depths, self.channels, self.attn_depths, dt, name="unet")(x, cond)
        else:
            ca = self.cross_attention
            past = unstack_frames(pad_to_multiple(obs, multiple), n)
            tokens = HistoryEncoder(self.num_actions, self.action_kind, self.cond_channels, ca.channels, dt,
                                    name="history_encoder")(past, act, null if self.null_target else None)
            contexts = [tokens[i] if i in ca.levels else None for i in range(len(self.channels))]
            x = Conv(self.channels[0], dtype=dt, name="conv_in")(pad_to_multiple(noisy_next_obs, multiple))
            x = UNet(self.depths, self.channels, self.attn_depths, dt, ca.heads, name="unet")(x, cond, contexts)
        x = Conv(self.img_channels, kernel_init=nn.initializers.zeros, dtype=dt, name="conv_out")(
            nn.silu(GroupNorm(dt, name="norm_out")(x))).astype(jnp.float32)
        return x[:, :h, :w]


def interpolation_from_config(d) -> Optional[interp.Interpolation]:
    """The Interpolation of a denoiser section; None where it has none or its steps are 0 (configs without the
    field, RL configs, the upsampler's)."""
    ip = d.get("interpolation")
    if ip is None or not ip.steps:
        return None
    return interp.Interpolation(ip.steps, ip.p_interpolate, ip.motion_weighting, ip.motion_floor,
                                ip.intermediate_targets, ip.intermediate_power, d.training.num_autoregressive_steps)


class Conditioners(NamedTuple):
    c_in: jax.Array
    c_out: jax.Array
    c_skip: jax.Array
    c_noise: jax.Array


def compute_conditioners(sigma: jax.Array, sigma_data: float, sigma_offset_noise: float) -> Conditioners:
    """EDM preconditioning with offset noise: the effective noise level is sqrt(sigma^2 + offset^2)."""
    sigma = jnp.sqrt(sigma ** 2 + sigma_offset_noise ** 2)
    c_in = 1 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * jnp.sqrt(c_skip)
    c_noise = jnp.log(sigma) / 4
    return Conditioners(c_in, c_out, c_skip, c_noise)


def quantize(x: jax.Array) -> jax.Array:
    """Clips to [-1, 1] and snaps to the 256 levels of a uint8 frame, truncating like the official `.byte()`."""
    levels = jnp.floor((jnp.clip(x, -1, 1) + 1) / 2 * 255)
    # The final clip absorbs the rounding of the division, which could otherwise give 1 + 1 ulp.
    return jnp.clip(levels / 127.5 - 1, -1, 1)


def stack_frames(obs: jax.Array) -> jax.Array:
    """[b, t, h, w, c] -> [b, h, w, t * c], frame-major channels like the official reshape."""
    b, t, h, w, c = obs.shape
    return obs.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * c)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the rows where mask is set (x: [b, ...], mask: [b]); 0 when no row is set."""
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(x.dtype)
    count = jnp.sum(jnp.broadcast_to(mask, x.shape))
    return jnp.sum(x * mask) / jnp.maximum(count, 1)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """The denoiser as pure functions of its variables; hashable, so jitted functions can close over it."""

    num_actions: int
    num_steps_conditioning: int = 4
    cond_channels: int = 256
    depths: Tuple[int, ...] = (2, 2, 2, 2)
    channels: Tuple[int, ...] = (64, 64, 64, 64)
    attn_depths: Tuple[int, ...] = (0, 0, 0, 0)
    sigma_data: float = 0.5
    sigma_offset_noise: float = 0.3
    # Training noise levels: log sigma ~ N(loc, scale^2), clipped.
    sigma_loc: float = -0.4
    sigma_scale: float = 1.2
    sigma_train_min: float = 2e-3
    sigma_train_max: float = 20.0
    compute_dtype: Dtype = jnp.float32  # of the U-Net (models/precision.py); the rest is float32
    action_kind: str = "discrete"  # one of ACTION_KINDS
    conditioning: str = "frame_stack"  # one of CONDITIONINGS
    cross_attention: Optional[CrossAttention] = None  # the sizes of conditioning "cross_attention"
    condition_dropout: float = 0.0  # training probability of a row on null inputs; 0: no null inputs
    condition_dropout_target: str = "all"  # one of CONDITION_DROPOUT_TARGETS: what a null row loses
    interpolation: Optional[interp.Interpolation] = None  # None: no interpolation inputs (the official model)
    # What it denoises: RGB frames in [-1, 1], its output clipped and snapped to the 256 levels of a uint8 frame
    # (quantize), or a latent world model's latents of img_channels channels, left as they are.
    img_channels: int = IMG_CHANNELS
    quantize: bool = True

    def __post_init__(self):
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"action_kind={self.action_kind!r}: use one of {', '.join(ACTION_KINDS)}")
        if (self.action_kind == "none") != (self.num_actions == 0):
            raise ValueError(f"num_actions={self.num_actions} with action_kind={self.action_kind!r}: 0 goes with "
                             "'none' and only with it")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={self.conditioning!r}: use one of {', '.join(CONDITIONINGS)}")
        if (self.conditioning == "cross_attention") != (self.cross_attention is not None):
            raise ValueError("cross_attention sizes go with conditioning 'cross_attention' and only with it")
        if self.condition_dropout_target not in CONDITION_DROPOUT_TARGETS:
            raise ValueError(f"condition_dropout_target={self.condition_dropout_target!r}: use one of "
                             f"{', '.join(CONDITION_DROPOUT_TARGETS)}")
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"condition_dropout={self.condition_dropout}: use a probability in [0, 1)")

    @classmethod
    def from_config(cls, config, num_actions: int, action_kind: str = "discrete",
                    section: str = "denoiser") -> "Denoiser":
        """The denoiser of config.<section> (RL configs: denoiser; world-model configs also: upsampler)."""
        d = config[section]
        im, sd = d.inner_model, d.sigma_distribution
        # Sections without the conditioning fields (the upsampler's; configs saved before they existed) are
        # frame-stack models without null inputs.
        conditioning = d.get("conditioning", "frame_stack")
        cross_attention = None
        if conditioning == "cross_attention":
            ca = d.cross_attention
            cross_attention = CrossAttention(tuple(ca.levels), ca.heads, tuple(ca.channels[:max(ca.levels) + 1]))
        return cls(
            num_actions=num_actions, num_steps_conditioning=im.num_steps_conditioning,
            cond_channels=im.cond_channels, depths=tuple(im.depths), channels=tuple(im.channels),
            attn_depths=tuple(im.attn_depths), sigma_data=d.sigma_data, sigma_offset_noise=d.sigma_offset_noise,
            sigma_loc=sd.loc, sigma_scale=sd.scale, sigma_train_min=sd.sigma_min, sigma_train_max=sd.sigma_max,
            compute_dtype=compute_dtype(config), action_kind=action_kind, conditioning=conditioning,
            cross_attention=cross_attention, condition_dropout=d.get("condition_dropout", 0.0),
            condition_dropout_target=d.get("condition_dropout_target", "all"),
            interpolation=interpolation_from_config(d),
        )

    @property
    def has_null_inputs(self) -> bool:
        """Whether the model can run unconditionally (and so be sampled with guidance)."""
        return self.condition_dropout > 0

    @property
    def inner_model(self) -> InnerModel:
        return InnerModel(self.num_actions, self.num_steps_conditioning, self.cond_channels, self.depths,
                          self.channels, self.attn_depths, self.compute_dtype, self.action_kind, self.conditioning,
                          self.cross_attention, self.condition_dropout_target if self.has_null_inputs else None,
                          self.interpolation.num_buckets if self.interpolation else 0, self.img_channels)

    def dummy_actions(self, b: int) -> jax.Array:
        """Actions of the right shape and dtype for b rows of conditioning (zeros)."""
        n = self.num_steps_conditioning
        if self.action_kind in ("multi_hot", "continuous"):
            return jnp.zeros((b, n, self.num_actions), jnp.float32)
        return jnp.zeros((b, n), jnp.int32)

    def init(self, key: jax.Array, size: Union[int, Tuple[int, int]]) -> Variables:
        """Variables for frames of `size` (square) or (height, width)."""
        n = self.num_steps_conditioning
        h, w = (size, size) if isinstance(size, int) else size
        extra = {}
        if self.interpolation:
            extra = {"target": jnp.zeros((1, h, w, IMG_CHANNELS)), "bucket": jnp.zeros((1,), jnp.int32)}
        # Jitted: eager initialisation dispatches thousands of small ops and is several times slower.
        return jax.jit(lambda key: dict(self.inner_model.init(
            init_key(key), jnp.zeros((1, h, w, self.img_channels)), jnp.zeros((1,)),
            jnp.zeros((1, h, w, n * self.img_channels)), self.dummy_actions(1), **extra)))(key)

    def conditioners(self, sigma: jax.Array) -> Conditioners:
        cs = compute_conditioners(sigma, self.sigma_data, self.sigma_offset_noise)
        # c_in, c_out, c_skip broadcast over pixels; c_noise stays one value per row.
        return Conditioners(*(c[:, None, None, None] for c in cs[:3]), cs.c_noise)

    def interpolation_inputs(self, b: int, shape, target: Optional[jax.Array],
                             bucket: Optional[jax.Array]) -> Dict[str, jax.Array]:
        """The inner model's target (scaled like the past frames) and bucket: none without interpolation; the
        dropped target and bucket "no interpolation" where a model with interpolation is given none."""
        if self.interpolation is None:
            if target is not None or bucket is not None:
                raise ValueError("a target frame needs a denoiser trained with interpolation: train one with "
                                 "--config.denoiser.interpolation.steps > 0")
            return {}
        if target is None:
            target = jnp.zeros((b,) + tuple(shape), jnp.float32)
            bucket = jnp.full((b,), self.interpolation.no_interpolation, jnp.int32)
        return {"target": target / self.sigma_data, "bucket": jnp.broadcast_to(bucket, (b,))}

    def model_output(self, variables: Variables, noisy_next_obs: jax.Array, obs: jax.Array, act: jax.Array,
                     cs: Conditioners, null: Optional[jax.Array] = None, target: Optional[jax.Array] = None,
                     bucket: Optional[jax.Array] = None) -> jax.Array:
        """F(c_in * x, c_noise, obs / sigma_data, act); obs: [b, t, h, w, c] past frames in [-1, 1]; null: [b]
        bool, rows to run on the null inputs (a model with condition_dropout > 0 only), None for none; target
        [b, h, w, c] in [-1, 1] and bucket int [b] (models/interpolation.py), for a model with interpolation only:
        None is autoregressive generation (the target dropped)."""
        extra = {} if null is None else {"null": null}
        extra.update(self.interpolation_inputs(noisy_next_obs.shape[0], noisy_next_obs.shape[1:], target, bucket))
        return self.inner_model.apply(variables, noisy_next_obs * cs.c_in, cs.c_noise,
                                      stack_frames(obs) / self.sigma_data, act, **extra)

    def guided_model_output(self, variables: Variables, noisy_next_obs: jax.Array, obs: jax.Array, act: jax.Array,
                            cs: Conditioners, guidance_scale: float, target: Optional[jax.Array] = None,
                            bucket: Optional[jax.Array] = None) -> jax.Array:
        """Classifier-free guidance, the paper's equation 4: (1 + w) F(x | past, actions) - w F(x | null), both
        terms from one call on the rows stacked twice."""
        if not self.has_null_inputs:
            raise ValueError(f"guidance_scale={guidance_scale} needs a denoiser trained with condition_dropout > 0 "
                             "(it has no null inputs): train one so, or sample with guidance_scale 0")
        b = noisy_next_obs.shape[0]
        twice = lambda x: jnp.concatenate([x, x])  # noqa: E731
        if target is not None:
            target, bucket = twice(target), twice(jnp.broadcast_to(bucket, (b,)))
        output = self.model_output(variables, twice(noisy_next_obs), twice(obs), twice(act),
                                   jax.tree.map(twice, cs), jnp.arange(2 * b) >= b, target, bucket)
        return (1 + guidance_scale) * output[:b] - guidance_scale * output[b:]

    def wrap_model_output(self, noisy_next_obs: jax.Array, model_output: jax.Array, cs: Conditioners) -> jax.Array:
        denoised = cs.c_skip * noisy_next_obs + cs.c_out * model_output
        return quantize(denoised) if self.quantize else denoised

    def denoise(self, variables: Variables, noisy_next_obs: jax.Array, sigma: jax.Array, obs: jax.Array,
                act: jax.Array, null: Optional[jax.Array] = None, guidance_scale: float = 0.0,
                target: Optional[jax.Array] = None, bucket: Optional[jax.Array] = None) -> jax.Array:
        """D(x, sigma), clipped and quantised. sigma: a scalar or one value per row; null, target and bucket as in
        model_output.

        guidance_scale w > 0: classifier-free guidance (guided_model_output); as c_skip * x is common to both
        terms, this is (1 + w) D(x | past, actions) - w D(x | null) before clipping and quantisation. w = 0 is
        the conditional D and traces no second call.
        """
        b = noisy_next_obs.shape[0]
        chex.assert_shape(obs, (b, self.num_steps_conditioning) + noisy_next_obs.shape[1:])
        cs = self.conditioners(jnp.broadcast_to(sigma, (b,)))
        if guidance_scale == 0:
            output = self.model_output(variables, noisy_next_obs, obs, act, cs, null, target, bucket)
        elif null is not None:
            raise ValueError("guidance combines the conditional and the null prediction of every row: pass null "
                             "only with guidance_scale 0")
        else:
            output = self.guided_model_output(variables, noisy_next_obs, obs, act, cs, guidance_scale, target, bucket)
        return self.wrap_model_output(noisy_next_obs, output, cs)

    def sample_sigma_training(self, key: jax.Array, n: int) -> jax.Array:
        log_sigma = jax.random.normal(key, (n,)) * self.sigma_scale + self.sigma_loc
        return jnp.clip(jnp.exp(log_sigma), self.sigma_train_min, self.sigma_train_max)

    def sample_null(self, key: jax.Array, n: int) -> jax.Array:
        """[n] bool: the rows of a training batch to run on the null inputs, each with probability
        condition_dropout (masked conditioning, the paper's section 4.2.2)."""
        return jax.random.bernoulli(key, self.condition_dropout, (n,))

    def apply_noise(self, key: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
        """x + offset * (one normal draw per image and channel) + sigma * noise."""
        key_offset, key_noise = jax.random.split(key)
        b, _, _, c = x.shape
        offset = self.sigma_offset_noise * jax.random.normal(key_offset, (b, 1, 1, c))
        return x + offset + jax.random.normal(key_noise, x.shape) * sigma[:, None, None, None]

    def loss(self, params: Any, buffers: Any, batch: Batch, key: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Mean over the predicted frames of the masked MSE of F against its EDM target.

        Each frame after the first is predicted from a context whose newest frame is the model's own
        (clipped, quantised, gradient-free) denoised output for the frame before, as in the official trainer.
        With interpolation: the dual-purpose loss of models/interpolation.py instead.
        """
        if self.interpolation is not None:
            return interp.loss(self, params, buffers, batch, key)
        n = self.num_steps_conditioning
        b, t = batch.act.shape[:2]
        chex.assert_shape(batch.obs, (b, t, None, None, self.img_channels))
        chex.assert_shape(batch.mask_padding, (b, t))
        seq_length = t - n
        assert seq_length >= 1, f"segments need more than {n} frames, got {t}"
        variables = {"params": params, "buffers": buffers}

        all_obs, losses = batch.obs, []
        # A Python loop: XLA's CPU backend ran the U-Net's backward pass about 10x slower inside a loop.
        for i, key_i in enumerate(jax.random.split(key, seq_length)):
            # A third key only with masked conditioning, so that without it the draws are the official model's.
            key_sigma, key_noise, *key_null = jax.random.split(key_i, 3 if self.has_null_inputs else 2)
            next_obs, mask = all_obs[:, n + i], batch.mask_padding[:, n + i]
            sigma = self.sample_sigma_training(key_sigma, b)
            noisy_next_obs = self.apply_noise(key_noise, next_obs, sigma)
            cs = self.conditioners(sigma)
            masked = {"null": self.sample_null(key_null[0], b)} if self.has_null_inputs else {}
            model_output = self.model_output(variables, noisy_next_obs, all_obs[:, i:n + i], batch.act[:, i:n + i], cs,
                                             **masked)
            target = (next_obs - cs.c_skip * noisy_next_obs) / cs.c_out
            losses.append(masked_mean((model_output - target) ** 2, mask))
            denoised = jax.lax.stop_gradient(self.wrap_model_output(noisy_next_obs, model_output, cs))
            all_obs = all_obs.at[:, n + i].set(denoised)

        loss = jnp.mean(jnp.stack(losses))
        return loss, {"loss_denoising": loss}
