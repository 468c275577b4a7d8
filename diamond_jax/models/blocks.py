"""Layers shared by the three models, NHWC, laid out layer for layer like the official release.

Module and parameter names follow the official PyTorch modules (`d_blocks_0/resblocks_1/norm1/linear`
for `d_blocks.0.resblocks.1.norm1.linear`) so that official checkpoints map onto ours by name.
Initialisation follows PyTorch's defaults, which the official training recipe was tuned with.

Every layer takes `dtype`, the compute dtype of models/precision.py's policy: its matrix products and
convolutions take operands of that dtype and return it, from float32 parameters; normalisation statistics,
softmaxes and the LSTM state stay float32. With float32 every cast is a no-op.
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn

from diamond_jax.models.sizes import num_groups, num_heads

GN_EPS = 1e-5

Initializer = Callable[..., jax.Array]
Dtype = Any  # a compute dtype: jnp.float32 or jnp.bfloat16 (models/precision.py)
HxCx = Tuple[jax.Array, jax.Array]  # an LSTM state (hidden, cell), each [b, lstm_dim]

# PyTorch's default for Linear and Conv weights: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def init_key(key: jax.Array) -> jax.Array:
    """A key for parameter initialisation only. XLA compiles a threefry generator per parameter, which made
    initialising even a tiny U-Net take over 10 s on a CPU; XLA's own bit generator compiles 3x faster.
    Deterministic for a given key on a given backend."""
    return jax.random.key(jax.random.bits(key, dtype=jnp.uint32), impl="unsafe_rbg")


class Dense(nn.Module):
    """Linear layer with PyTorch's default initialisation (or zeros)."""

    features: int
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel_init = nn.initializers.zeros if self.zero_init else torch_default_kernel_init
        kernel = self.param("kernel", kernel_init, (fan_in, self.features))
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        if self.use_bias:
            bias_init = nn.initializers.zeros if self.zero_init else torch_default_bias_init(fan_in)
            y = y + self.param("bias", bias_init, (self.features,)).astype(self.dtype)
        return y


class Conv(nn.Module):
    """Square convolution with PyTorch's padding (k // 2 on every side) and default initialisation.

    `kernel_init` replaces the weight initialiser (zeros, orthogonal); the bias keeps PyTorch's default
    unless `zero_bias`.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    kernel_init: Optional[Initializer] = None
    zero_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init, (k, k, x.shape[-1], self.features))
        bias_init = nn.initializers.zeros if self.zero_bias else torch_default_bias_init(fan_in)
        bias = self.param("bias", bias_init, (self.features,))
        # Explicit symmetric padding: SAME would pad stride-2 convolutions on one side only, unlike PyTorch.
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), [(k // 2, k // 2)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm with groups of GN_GROUP_SIZE channels (at least one group), learned affine. Flax computes the
    statistics and the normalisation in float32 whatever the input's dtype, and returns `dtype`."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.GroupNorm(num_groups(x.shape[-1]), epsilon=GN_EPS, use_fast_variance=False, dtype=self.dtype,
                            name="norm")(x)


class AdaGroupNorm(nn.Module):
    """GroupNorm whose scale and shift are predicted from a conditioning vector."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = nn.GroupNorm(num_groups(c), epsilon=GN_EPS, use_scale=False, use_bias=False, use_fast_variance=False,
                         dtype=self.dtype)(x)
        scale, shift = jnp.split(Dense(2 * c, dtype=self.dtype, name="linear")(cond)[:, None, None, :], 2, axis=-1)
        return x * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels, heads of ATTN_HEAD_DIM channels; the softmax in float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        n_head = num_heads(c)
        head_dim = c // n_head
        x = GroupNorm(self.dtype, name="norm")(x)
        qkv = Conv(3 * c, kernel_size=1, dtype=self.dtype, name="qkv_proj")(x)
        # Channels are [q heads | k heads | v heads], each head contiguous, as in the official layout.
        qkv = qkv.reshape(n, h * w, 3, n_head, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = jax.nn.softmax((q @ k.swapaxes(-1, -2) / math.sqrt(head_dim)).astype(jnp.float32), axis=-1)
        y = (att.astype(self.dtype) @ v).transpose(0, 2, 1, 3).reshape(n, h, w, c)
        # The official block adds the output to the *normalised* input; kept for checkpoint compatibility.
        return x + Conv(c, kernel_size=1, kernel_init=nn.initializers.zeros, zero_bias=True, dtype=self.dtype,
                        name="out_proj")(y)


class CrossAttention2d(nn.Module):
    """Multi-head attention of every pixel of x [n, h, w, c] to the tokens of a context [n, L, c_context] (the
    history encoder's activations, models/denoiser.py), softmax in float32. Residual around a zero-initialised
    output projection, so that a freshly added block leaves the U-Net's computation as it was."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        chex.assert_shape(context, (n, None, None))
        assert c % self.heads == 0, f"{c} channels do not split into {self.heads} heads"
        head_dim, length = c // self.heads, context.shape[1]
        q = Dense(c, dtype=self.dtype, name="q_proj")(GroupNorm(self.dtype, name="norm")(x).reshape(n, h * w, c))
        kv = Dense(2 * c, dtype=self.dtype, name="kv_proj")(context)
        q = q.reshape(n, h * w, self.heads, head_dim).transpose(0, 2, 1, 3)
        k, v = kv.reshape(n, length, 2, self.heads, head_dim).transpose(2, 0, 3, 1, 4)
        att = jax.nn.softmax((q @ k.swapaxes(-1, -2) / math.sqrt(head_dim)).astype(jnp.float32), axis=-1)
        y = (att.astype(self.dtype) @ v).transpose(0, 2, 1, 3).reshape(n, h, w, c)
        return x + Dense(c, zero_init=True, dtype=self.dtype, name="out_proj")(y)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar per row (a buffer, not a trained parameter), in float32 under
    every policy: the noise level's phase 2 pi c_noise w reaches tens of radians, which bfloat16's 8-bit
    mantissa would blur by a tenth of a radian."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        assert x.ndim == 1, x.shape
        weight = self.variable(
            "buffers", "weight", lambda: jax.random.normal(self.make_rng("params"), (1, self.features // 2))
        ).value
        f = 2 * math.pi * x[:, None] @ weight
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


class Downsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(x.shape[-1], stride=2, kernel_init=nn.initializers.orthogonal(), dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(x.shape[-1], dtype=self.dtype, name="conv")(x)


class SmallResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, plus the input (1x1-projected when channels change)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        skip = x if x.shape[-1] == self.out_channels else Conv(self.out_channels, 1, dtype=dt,
                                                                 name="skip_projection")(x)
        # Named f_0 and f_2 like the official nn.Sequential(GroupNorm, SiLU, Conv3x3).
        return skip + Conv(self.out_channels, dtype=dt, name="f_2")(nn.silu(GroupNorm(dt, name="f_0")(x)))


class ResBlock(nn.Module):
    """AdaGroupNorm -> SiLU -> conv3x3 -> AdaGroupNorm -> SiLU -> conv3x3 (zero-init), residual, attention; with
    a context, then cross-attention to it (`cross_attn_heads` heads)."""

    out_channels: int
    attn: bool
    dtype: Dtype = jnp.float32
    cross_attn_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        dt = self.dtype
        r = x if x.shape[-1] == self.out_channels else Conv(self.out_channels, 1, dtype=dt, name="proj")(x)
        x = Conv(self.out_channels, dtype=dt, name="conv1")(nn.silu(AdaGroupNorm(dt, name="norm1")(x, cond)))
        x = Conv(self.out_channels, kernel_init=nn.initializers.zeros, dtype=dt, name="conv2")(
            nn.silu(AdaGroupNorm(dt, name="norm2")(x, cond)))
        x = x + r
        x = SelfAttention2d(dt, name="attn")(x) if self.attn else x
        return x if context is None else CrossAttention2d(self.cross_attn_heads, dt, name="cross_attn")(x, context)


class ResBlocks(nn.Module):
    """A sequence of ResBlocks; with `to_cat`, each block first concatenates one skip tensor; with a context,
    each block cross-attends to it."""

    out_channels: Sequence[int]
    attn: bool
    dtype: Dtype = jnp.float32
    cross_attn_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, to_cat: Optional[Sequence[jax.Array]] = None,
                 context: Optional[jax.Array] = None) -> Tuple[jax.Array, List[jax.Array]]:
        outputs = []
        for i, out_ch in enumerate(self.out_channels):
            if to_cat is not None:
                x = jnp.concatenate([x, to_cat[i]], axis=-1)
            x = ResBlock(out_ch, self.attn, self.dtype, self.cross_attn_heads, name=f"resblocks_{i}")(
                x, cond, context)
            outputs.append(x)
        return x, outputs


class UNet(nn.Module):
    """The official U-Net: levels of ResBlocks, two attention blocks in the middle, skips at every block.

    `contexts` (the cross-attention variant of models/denoiser.py): one per level, None where the level does
    not cross-attend; every block of a level that has one (the middle blocks: the last level's) cross-attends to
    it with `cross_attn_heads` heads. Without contexts, the official U-Net exactly.
    """

    depths: Sequence[int]
    channels: Sequence[int]
    attn_depths: Sequence[int]
    dtype: Dtype = jnp.float32
    cross_attn_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array,
                 contexts: Optional[Sequence[Optional[jax.Array]]] = None) -> jax.Array:
        depths, channels, dt, heads = self.depths, self.channels, self.dtype, self.cross_attn_heads
        num_down = len(channels) - 1
        assert x.shape[1] % 2 ** num_down == 0 and x.shape[2] % 2 ** num_down == 0, (x.shape, num_down)
        contexts = [None] * len(depths) if contexts is None else list(contexts)
        assert len(contexts) == len(depths), (len(contexts), len(depths))

        d_outputs = []
        for i, n in enumerate(depths):
            x_down = Downsample(dt, name=f"downsamples_{i}")(x) if i > 0 else x
            x, block_outputs = ResBlocks([channels[i]] * n, bool(self.attn_depths[i]), dt, heads,
                                         name=f"d_blocks_{i}")(x_down, cond, context=contexts[i])
            d_outputs.append((x_down, *block_outputs))

        x, _ = ResBlocks([channels[-1]] * 2, True, dt, heads, name="mid_blocks")(x, cond, context=contexts[-1])

        # Up level j mirrors down level i = L-1-j, and ends with the channels of the level above.
        for j, skip in enumerate(reversed(d_outputs)):
            i = len(depths) - 1 - j
            x = Upsample(dt, name=f"upsamples_{j}")(x) if j > 0 else x
            out = [channels[i]] * depths[i] + [channels[max(0, i - 1)]]
            x, _ = ResBlocks(out, bool(self.attn_depths[i]), dt, heads, name=f"u_blocks_{j}")(
                x, cond, skip[::-1], contexts[i])
        return x


class LSTMCell(nn.Module):
    """LSTM cell with PyTorch's parameter layout (gates i, f, g, o) and the official initialisation:
    Xavier-uniform input weights, orthogonal recurrent weights, zero biases but a forget-gate bias of 1.
    Carry first, Flax style, so that nn.scan can run it over time. The two products run in `dtype`; the gates
    and the state are float32, so that rounding does not accumulate along a sequence.
    """

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hx_cx: HxCx, x: jax.Array) -> Tuple[HxCx, jax.Array]:
        hx, cx = hx_cx
        h = self.hidden

        def forget_bias_one(key, shape, dtype=jnp.float32):
            return jnp.zeros(shape, dtype).at[h:2 * h].set(1)

        w_ih = self.param("kernel_ih", nn.initializers.xavier_uniform(), (x.shape[-1], 4 * h))
        w_hh = self.param("kernel_hh", nn.initializers.orthogonal(), (h, 4 * h))
        b_ih = self.param("bias_ih", forget_bias_one, (4 * h,))
        b_hh = self.param("bias_hh", nn.initializers.zeros, (4 * h,))
        def product(a, w):
            return (a.astype(self.dtype) @ w.astype(self.dtype)).astype(jnp.float32)

        gates = product(x, w_ih) + b_ih + product(hx, w_hh) + b_hh
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        cx = jax.nn.sigmoid(f) * cx + jax.nn.sigmoid(i) * jnp.tanh(g)
        hx = jax.nn.sigmoid(o) * jnp.tanh(cx)
        return (hx, cx), hx


def flatten_chw(x: jax.Array) -> jax.Array:
    """[b, h, w, c] -> [b, c * h * w] in PyTorch's (c, h, w) order, so that LSTM input weights convert as is."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
