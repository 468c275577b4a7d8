"""A KL autoencoder of frames, in the architecture family of Stable Diffusion's (diffusers' `AutoencoderKL`), for
world models that denoise in its latent space.

encoder: conv_in, one down block per entry of block_out_channels (layers_per_block residual blocks, then a
stride-2 convolution except after the last), a middle block (residual, single-head self-attention, residual),
GroupNorm + SiLU + conv_out to the 2 x latent_channels moments (mean, log-variance); quant_conv (1x1) on them.
decoder: post_quant_conv (1x1), conv_in, the middle block, one up block per level in reverse
(layers_per_block + 1 residual blocks, then 2x nearest upsampling and a convolution except after the last),
GroupNorm + SiLU + conv_out to RGB. The downsampling factor is 2^(len(block_out_channels) - 1); SD's
`ch * ch_mult` is block_out_channels (SD 1.x: 128 * (1, 2, 4, 4) = (128, 256, 512, 512), factor 8).

Module and parameter names follow diffusers' (`encoder/down_blocks_0/resnets_1/norm1` for
`encoder.down_blocks.0.resnets.1.norm1`) so that convert_vae.py maps a diffusers checkpoint onto ours by name.
Frames are NHWC in [-1, 1]. The latents the world model sees are `(mean - shift_factor) * scaling_factor`
(diffusers' convention), the posterior's mean: one deterministic latent per frame.
"""

import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diamond_jax.models.blocks import init_key, torch_default_bias_init, torch_default_kernel_init

NORM_EPS = 1e-6  # diffusers' resnet_eps, in every GroupNorm of the autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clipped to this range, as diffusers does
RGB = 3
Variables = Dict[str, Any]


class Conv2d(nn.Module):
    """A convolution with PyTorch's default initialisation and explicit padding ((top, bottom), (left, right))."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Tuple[Tuple[int, int], Tuple[int, int]] = ((1, 1), (1, 1))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        kernel = self.param("kernel", torch_default_kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,))
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def conv1x1(features: int, name: str) -> Conv2d:
    return Conv2d(features, 1, padding=((0, 0), (0, 0)), name=name)


class Linear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", torch_default_kernel_init, (x.shape[-1], self.features))
        return x @ kernel + self.param("bias", torch_default_bias_init(x.shape[-1]), (self.features,))


def group_norm(groups: int, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=NORM_EPS, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus the input (through a 1x1 conv when channels change)."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv2d(self.features, name="conv1")(nn.silu(group_norm(self.groups, "norm1")(x)))
        h = Conv2d(self.features, name="conv2")(nn.silu(group_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = conv1x1(self.features, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels with a pre-GroupNorm and a residual connection (the middle
    block's; diffusers' heads = channels // attention_head_dim = 1). The softmax in float32."""

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (Linear(c, name=n)(t) for n in ("to_q", "to_k", "to_v"))
        weights = jax.nn.softmax((q @ k.swapaxes(1, 2)).astype(jnp.float32) / math.sqrt(c), axis=-1)
        out = Linear(c, name="to_out_0")(weights.astype(v.dtype) @ v)
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    attention: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnets_0")(x)
        if self.attention:
            x = Attention(self.groups, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Resample(nn.Module):
    """diffusers' Downsample2D (a stride-2 convolution after one row and column of zeros at the bottom and right)
    or Upsample2D (2x nearest-neighbour, then a convolution); its convolution is named `conv`."""

    down: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down:
            return Conv2d(x.shape[-1], 3, 2, ((0, 1), (0, 1)), name="conv")(x)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv2d(x.shape[-1], name="conv")(x)


class Block(nn.Module):
    """A down block (DownEncoderBlock2D) or an up block (UpDecoderBlock2D): residual blocks, then an optional
    resampling."""

    features: int
    num_layers: int
    groups: int
    resample: bool
    down: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(x)
        if self.resample:
            x = Resample(self.down, name="downsamplers_0" if self.down else "upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_attention: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv2d(self.block_out_channels[0], name="conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            x = Block(ch, self.layers_per_block, self.groups, i < last, True, name=f"down_blocks_{i}")(x)
        x = MidBlock(self.groups, self.mid_attention, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, "conv_norm_out")(x))
        return Conv2d(2 * self.latent_channels, name="conv_out")(x)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_attention: bool

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = list(reversed(self.block_out_channels))
        x = Conv2d(channels[0], name="conv_in")(z)
        x = MidBlock(self.groups, self.mid_attention, name="mid_block")(x)
        for i, ch in enumerate(channels):
            x = Block(ch, self.layers_per_block + 1, self.groups, i < len(channels) - 1, False,
                      name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, "conv_norm_out")(x))
        return Conv2d(RGB, name="conv_out")(x)


class AutoencoderKLModule(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def setup(self):
        self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels, self.groups,
                               self.mid_attention)
        self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.groups, self.mid_attention)
        if self.use_quant_conv:
            self.quant_conv = conv1x1(2 * self.latent_channels, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv1x1(self.latent_channels, "post_quant_conv")

    def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """The posterior's (mean, logvar), each [b, h / f, w / f, latent_channels]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """The autoencoder as pure functions of its variables ({"params": ...}); hashable, so jitted functions can
    close over it. Latents are scaled: z = (mean - shift_factor) * scaling_factor."""

    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels}: each must be divisible by "
                                 f"norm_num_groups ({self.norm_num_groups})")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}: must be > 0 (measure it, or take the "
                             "checkpoint's)")

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Autoencoder":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown autoencoder fields {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_json(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def module(self) -> AutoencoderKLModule:
        return AutoencoderKLModule(self.block_out_channels, self.layers_per_block, self.latent_channels,
                                   self.norm_num_groups, self.mid_block_add_attention, self.use_quant_conv,
                                   self.use_post_quant_conv)

    def latent_shape(self, size: Tuple[int, int]) -> Tuple[int, int, int]:
        """(h, w, latent_channels) of the latents of frames of `size`."""
        self.check_size(size)
        return size[0] // self.downsampling, size[1] // self.downsampling, self.latent_channels

    def check_size(self, size: Tuple[int, int]) -> None:
        f = self.downsampling
        if size[0] % f or size[1] % f:
            raise ValueError(f"frames of {size[0]}x{size[1]} do not divide by the autoencoder's downsampling "
                             f"factor {f} (2^(len(block_out_channels) - 1)). Fix: a resolution that {f} divides.")

    def init(self, key: jax.Array, size: Tuple[int, int]) -> Variables:
        self.check_size(size)
        x = jnp.zeros((1,) + tuple(size) + (RGB,))
        return jax.jit(lambda k: dict(self.module.init(init_key(k), x)))(key)

    def moments(self, variables: Variables, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """The unscaled posterior (mean, logvar) of frames x [b, H, W, 3] in [-1, 1]."""
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, RGB)
        return self.module.apply(variables, x, method="encode")

    def decode_unscaled(self, variables: Variables, z: jax.Array) -> jax.Array:
        chex.assert_rank(z, 4)
        chex.assert_axis_dimension(z, -1, self.latent_channels)
        return self.module.apply(variables, z, method="decode")

    def encode(self, variables: Variables, x: jax.Array) -> jax.Array:
        """Scaled latents [..., h, w, latent_channels] of frames [..., H, W, 3] in [-1, 1]: the posterior's mean."""
        lead = x.shape[:-3]
        mean, _ = self.moments(variables, x.reshape((-1,) + x.shape[-3:]))
        z = (mean - self.shift_factor) * self.scaling_factor
        return z.reshape(lead + z.shape[1:])

    def decode(self, variables: Variables, z: jax.Array) -> jax.Array:
        """Frames [..., H, W, 3] (unclipped) of scaled latents [..., h, w, latent_channels]."""
        lead = z.shape[:-3]
        x = self.decode_unscaled(variables, z.reshape((-1,) + z.shape[-3:]) / self.scaling_factor
                                 + self.shift_factor)
        return x.reshape(lead + x.shape[1:])

    def decode_frames(self, variables: Variables, z: jax.Array) -> jax.Array:
        """decode, clipped to [-1, 1] and rounded to the 256 levels of a uint8 frame, as drawn frames are."""
        levels = jnp.round((jnp.clip(self.decode(variables, z), -1, 1) + 1) * 127.5)
        return levels / 127.5 - 1


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each row's latent elements: [b]."""
    return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=tuple(range(1, mean.ndim)))
