"""The actor-critic: a small convolutional encoder, an LSTM cell, policy and value heads
initialised to zero; REINFORCE with a value baseline on lambda-returns, value MSE and an entropy bonus."""

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn

from diamond_jax.models.blocks import Conv, Dense, Dtype, HxCx, LSTMCell, SmallResBlock, flatten_chw, init_key
from diamond_jax.models.precision import compute_dtype


class ActorCriticOutput(NamedTuple):
    logits_act: jax.Array  # [b, num_actions]
    val: jax.Array  # [b]
    hx_cx: HxCx  # the LSTM state after this observation


class ActorCriticNet(nn.Module):
    """Computes in `dtype` (models/precision.py); returns float32 logits, value and LSTM state."""

    num_actions: int
    lstm_dim: int
    channels: Sequence[int]
    down: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, obs: jax.Array, hx_cx: HxCx) -> ActorCriticOutput:
        b = obs.shape[0]
        chex.assert_shape(obs, (b, None, None, 3))
        chex.assert_shape(hx_cx, [(b, self.lstm_dim)] * 2)
        # Names are the indices of the official nn.Sequential: conv, then (block, max-pool) per level.
        dt = self.dtype
        x = Conv(self.channels[0], dtype=dt, name="encoder_0")(obs)
        index = 1
        for i, ch in enumerate(self.channels):
            x = SmallResBlock(ch, dt, name=f"encoder_{index}")(x)
            index += 1
            if self.down[i]:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
        hx_cx, hx = LSTMCell(self.lstm_dim, dt, name="lstm")(hx_cx, flatten_chw(x))
        logits = Dense(self.num_actions, zero_init=True, dtype=dt, name="actor_linear")(hx)
        val = Dense(1, zero_init=True, dtype=dt, name="critic_linear")(hx)[:, 0]
        return ActorCriticOutput(logits.astype(jnp.float32), val.astype(jnp.float32), hx_cx)


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    num_actions: int
    lstm_dim: int = 512
    channels: Tuple[int, ...] = (32, 32, 64, 64)
    down: Tuple[int, ...] = (1, 1, 1, 1)
    gamma: float = 0.985
    lambda_: float = 0.95
    weight_value_loss: float = 1.0
    weight_entropy_loss: float = 0.001
    compute_dtype: Dtype = jnp.float32  # models/precision.py

    @classmethod
    def from_config(cls, config, num_actions: int) -> "ActorCritic":
        ac = config.actor_critic
        return cls(num_actions=num_actions, lstm_dim=ac.lstm_dim, channels=tuple(ac.channels),
                   down=tuple(ac.down), compute_dtype=compute_dtype(config), **ac.loss.to_dict())

    @property
    def net(self) -> ActorCriticNet:
        return ActorCriticNet(self.num_actions, self.lstm_dim, self.channels, self.down, self.compute_dtype)

    def init(self, key: jax.Array, size: int) -> Dict[str, Any]:
        def init(key):
            return dict(self.net.init(init_key(key), jnp.zeros((1, size, size, 3)), self.initial_state(1)))

        return jax.jit(init)(key)

    def initial_state(self, batch_size: int) -> HxCx:
        zeros = jnp.zeros((batch_size, self.lstm_dim))
        return zeros, zeros

    def predict_act_value(self, variables: Dict[str, Any], obs: jax.Array, hx_cx: HxCx) -> ActorCriticOutput:
        """One step on frames obs [b, h, w, 3] in [-1, 1]."""
        return self.net.apply(variables, obs, hx_cx)

    def burn_in(self, variables: Dict[str, Any], obs: jax.Array, hx_cx: HxCx) -> ActorCriticOutput:
        """Runs the LSTM over frames obs [b, t, h, w, 3] (t is small); returns the output at the last frame."""
        # A Python loop, not a scan: XLA's CPU backend differentiates convolutions inside loops 10-40x slower.
        for t in range(obs.shape[1]):
            out = self.predict_act_value(variables, obs[:, t], hx_cx)
            hx_cx = out.hx_cx
        return out

    def loss(self, logits_act: jax.Array, val: jax.Array, act: jax.Array, rew: jax.Array, end: jax.Array,
             trunc: jax.Array, val_bootstrap: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """The official loss on a trajectory; every input is [b, T] except logits_act [b, T, num_actions]."""
        chex.assert_equal_shape([val, rew, end, trunc, val_bootstrap, act])
        lambda_returns = jax.lax.stop_gradient(
            compute_lambda_returns(rew, end, trunc, val_bootstrap, self.gamma, self.lambda_))
        log_probs = jax.nn.log_softmax(logits_act)
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
        log_prob_act = jnp.take_along_axis(log_probs, act[..., None], axis=-1)[..., 0]
        loss_actions = jnp.mean(-log_prob_act * jax.lax.stop_gradient(lambda_returns - val))
        loss_values = self.weight_value_loss * jnp.mean((val - lambda_returns) ** 2)
        loss_entropy = -self.weight_entropy_loss * entropy
        loss = loss_actions + loss_entropy + loss_values
        metrics = {
            "policy_entropy": entropy / math.log(2),  # in bits
            "loss_actions": loss_actions,
            "loss_entropy": loss_entropy,
            "loss_values": loss_values,
            "loss_total": loss,
        }
        return loss, metrics


def compute_lambda_returns(rew: jax.Array, end: jax.Array, trunc: jax.Array, val_bootstrap: jax.Array,
                           gamma: float, lambda_: float) -> jax.Array:
    """Lambda-returns on [b, T] arrays, with the official conventions.

    rew is sign-clipped. val_bootstrap[:, t] is the value of the state reached after step t (the final
    observation when the episode ended or was cut there). An end stops bootstrapping; a truncation
    bootstraps fully from the value (no lambda mixing past it); neither lets later returns leak back.
    """
    chex.assert_rank([rew, end, trunc, val_bootstrap], 2)
    chex.assert_equal_shape([rew, end, trunc, val_bootstrap])
    r_t = jnp.sign(rew)
    end_t = end.astype(r_t.dtype)
    trunc_t = trunc.astype(r_t.dtype)
    continues_t = 1 - jnp.clip(end_t + trunc_t, 0, 1)
    one_step = r_t + (1 - end_t) * gamma * ((1 - trunc_t) * (1 - lambda_) + trunc_t) * val_bootstrap

    def step(next_return, inputs):
        one_step_t, continues = inputs
        g = one_step_t + continues * gamma * lambda_ * next_return
        return g, g

    # Time-major reverse scan; the return after the last step is its bootstrap value.
    _, returns = jax.lax.scan(step, val_bootstrap[:, -1], (one_step.T, continues_t.T), reverse=True)
    return returns.T
