"""The reward/termination model: an action-conditioned encoder of (obs_t, obs_t+1), an
LSTM over time, and heads for 3 reward classes (sign of the reward) and 2 end classes."""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn

from diamond_jax.data.batch import Batch
from diamond_jax.models.blocks import (Conv, Dense, Downsample, Dtype, HxCx, LSTMCell, ResBlocks, flatten_chw,
                                       init_key)
from diamond_jax.models.precision import compute_dtype


class RewEndEncoder(nn.Module):
    depths: Sequence[int]
    channels: Sequence[int]
    attn_depths: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        dt = self.dtype
        x = Conv(self.channels[0], dtype=dt, name="conv_in")(x)
        for i, n in enumerate(self.depths):
            x = Downsample(dt, name=f"downsamples_{i}")(x) if i > 0 else x
            x, _ = ResBlocks([self.channels[i]] * n, bool(self.attn_depths[i]), dt, name=f"blocks_{i}")(x, cond)
        x, _ = ResBlocks([self.channels[-1]] * 2, True, dt, name=f"blocks_{len(self.depths)}")(x, cond)
        return x


class RewEndNet(nn.Module):
    """Computes in `dtype` (models/precision.py); returns float32 logits and LSTM state."""

    num_actions: int
    lstm_dim: int
    cond_channels: int
    depths: Sequence[int]
    channels: Sequence[int]
    attn_depths: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array, next_obs: jax.Array,
                 hx_cx: HxCx) -> Tuple[jax.Array, jax.Array, HxCx]:
        b, t = act.shape
        chex.assert_shape([obs, next_obs], (b, t, None, None, 3))
        chex.assert_shape(hx_cx, [(b, self.lstm_dim)] * 2)
        frames = jnp.concatenate([obs, next_obs], axis=-1).reshape((b * t,) + obs.shape[2:4] + (6,))
        cond = nn.Embed(self.num_actions, self.cond_channels, embedding_init=nn.initializers.normal(1.0),
                        name="act_emb")(act.reshape(b * t))
        dt = self.dtype
        x = RewEndEncoder(self.depths, self.channels, self.attn_depths, dt, name="encoder")(frames, cond)
        x = flatten_chw(x).reshape(b, t, -1)
        lstm = nn.scan(LSTMCell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1,
                       out_axes=1)(self.lstm_dim, dt, name="lstm")
        hx_cx, x = lstm(hx_cx, x)
        logits = Dense(self.lstm_dim, dtype=dt, name="head_0")(x)
        logits = Dense(3 + 2, use_bias=False, dtype=dt, name="head_2")(nn.silu(logits)).astype(jnp.float32)
        return logits[..., :3], logits[..., 3:], hx_cx


@dataclasses.dataclass(frozen=True)
class RewEndModel:
    num_actions: int
    lstm_dim: int = 512
    cond_channels: int = 128
    depths: Tuple[int, ...] = (2, 2, 2, 2)
    channels: Tuple[int, ...] = (32, 32, 32, 32)
    attn_depths: Tuple[int, ...] = (0, 0, 0, 0)
    compute_dtype: Dtype = jnp.float32  # models/precision.py

    @classmethod
    def from_config(cls, config, num_actions: int) -> "RewEndModel":
        r = config.rew_end_model
        return cls(num_actions=num_actions, lstm_dim=r.lstm_dim, cond_channels=r.cond_channels,
                   depths=tuple(r.depths), channels=tuple(r.channels), attn_depths=tuple(r.attn_depths),
                   compute_dtype=compute_dtype(config))

    @property
    def net(self) -> RewEndNet:
        return RewEndNet(self.num_actions, self.lstm_dim, self.cond_channels, self.depths, self.channels,
                         self.attn_depths, self.compute_dtype)

    def init(self, key: jax.Array, size: int) -> Dict[str, Any]:
        frames = jnp.zeros((1, 1, size, size, 3))
        return jax.jit(lambda key: dict(self.net.init(init_key(key), frames, jnp.zeros((1, 1), jnp.int32), frames,
                                                      self.initial_state(1))))(key)

    def initial_state(self, batch_size: int) -> HxCx:
        zeros = jnp.zeros((batch_size, self.lstm_dim))
        return zeros, zeros

    def predict_rew_end(self, variables: Dict[str, Any], obs: jax.Array, act: jax.Array, next_obs: jax.Array,
                        hx_cx: Optional[HxCx] = None) -> Tuple[jax.Array, jax.Array, HxCx]:
        """Reward logits [b, t, 3] (classes -1, 0, 1), end logits [b, t, 2] and the LSTM state after t steps."""
        if hx_cx is None:
            hx_cx = self.initial_state(act.shape[0])
        return self.net.apply(variables, obs, act, next_obs, hx_cx)

    def loss(self, params: Any, buffers: Any, batch: Batch, key: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Cross-entropy on sign(rew) + 1 and on end over the real transitions of the segments.

        The batch's frame after an episode's last step is its real final frame (see Batch), so the model
        learns rewards and ends from the true last transition rather than from a padding frame.
        """
        del key  # deterministic
        mask = batch.mask_padding[:, :-1]
        logits_rew, logits_end, _ = self.predict_rew_end(
            {"params": params, "buffers": buffers}, batch.obs[:, :-1], batch.act[:, :-1], batch.obs[:, 1:])
        target_rew = (jnp.sign(batch.rew[:, :-1]) + 1).astype(jnp.int32)
        target_end = batch.end[:, :-1].astype(jnp.int32)
        loss_rew = _masked_cross_entropy(logits_rew, target_rew, mask)
        loss_end = _masked_cross_entropy(logits_end, target_end, mask)
        loss = loss_rew + loss_end
        return loss, {
            "loss_rew": loss_rew,
            "loss_end": loss_end,
            "loss_total": loss,
            # Row = target class, column = predicted class, over real transitions.
            "confusion_rew": _confusion(logits_rew, target_rew, mask),
            "confusion_end": _confusion(logits_end, target_end, mask),
        }


def _masked_cross_entropy(logits: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def _confusion(logits: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    k = logits.shape[-1]
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), k)
    true = jax.nn.one_hot(target, k) * mask[..., None]
    return jnp.einsum("bti,btj->ij", true, pred).astype(jnp.int32)
