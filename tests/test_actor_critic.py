import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diamond_jax.models.actor_critic import compute_lambda_returns
from diamond_jax.training import steps


def lambda_returns_loop(rew, end, trunc, val_bootstrap, gamma, lambda_):
    """G_t = r_t + gamma ((1 - lambda) V_t+1 + lambda G_t+1), cut at ends (G_t = r_t) and truncations
    (G_t = r_t + gamma V_t+1); after the last step G = V. Rewards sign-clipped."""
    b, t_max = rew.shape
    out = np.zeros((b, t_max))
    for i in range(b):
        g_next = val_bootstrap[i, -1]
        for t in reversed(range(t_max)):
            r, v_next = np.sign(rew[i, t]), val_bootstrap[i, t]
            if end[i, t]:
                g = r
            elif trunc[i, t]:
                g = r + gamma * v_next
            else:
                g = r + gamma * ((1 - lambda_) * v_next + lambda_ * g_next)
            out[i, t] = g
            g_next = g
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma, lambda_", [(0.985, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_lambda_returns_equal_a_plain_loop(seed, gamma, lambda_):
    rng = np.random.default_rng(seed)
    shape = (5, 15)
    rew = rng.normal(size=shape) * (rng.random(shape) < 0.4)
    end = (rng.random(shape) < 0.1).astype(np.int32)
    trunc = ((rng.random(shape) < 0.1) & (end == 0)).astype(np.int32)
    val = rng.normal(size=shape)
    expected = lambda_returns_loop(rew, end, trunc, val, gamma, lambda_)
    got = compute_lambda_returns(jnp.asarray(rew), jnp.asarray(end), jnp.asarray(trunc), jnp.asarray(val), gamma,
                                 lambda_)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("end, trunc, expected", [
    # gamma = lambda = 0.5, rewards (1, 0, -2 -> -1), bootstrap values (2, 4, 8); worked by hand:
    # one-step parts r + gamma (1 - lambda) V = (1.5, 1.0, 1.0); G2 = 1 + 0.25 * 8 = 3, G1 = 1 + 0.25 * 3,
    # G0 = 1.5 + 0.25 * G1.
    ([0, 0, 0], [0, 0, 0], [1.9375, 1.75, 3.0]),
    ([0, 1, 0], [0, 0, 0], [1.5, 0.0, 3.0]),  # an end: G1 = r1 = 0, nothing flows back
    ([0, 0, 0], [0, 1, 0], [2.0, 2.0, 3.0]),  # a truncation: G1 = r1 + gamma V2' = 0.5 * 4
])
def test_lambda_returns_by_hand(end, trunc, expected):
    got = compute_lambda_returns(jnp.array([[1.0, 0.0, -2.0]]), jnp.array([end]), jnp.array([trunc]),
                                 jnp.array([[2.0, 4.0, 8.0]]), 0.5, 0.5)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_outputs_start_at_zero(debug_agent):
    agent, variables = debug_agent
    ac = agent.actor_critic
    obs = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    hx_cx = tuple(jax.random.normal(jax.random.key(1), (3, ac.lstm_dim)) for _ in range(2))
    out = ac.predict_act_value(variables["actor_critic"], obs, hx_cx)
    assert out.logits_act.shape == (3, 4) and out.val.shape == (3,)
    assert out.logits_act.dtype == jnp.float32 and out.hx_cx[0].shape == (3, ac.lstm_dim)
    np.testing.assert_array_equal(out.logits_act, 0.0)
    np.testing.assert_array_equal(out.val, 0.0)
    assert not np.allclose(out.hx_cx[0], hx_cx[0])


def test_positive_advantage_raises_the_actions_probability(debug_agent):
    """A fixed trajectory in which action 2 was always taken and always rewarded: after one update the policy
    gives action 2 more probability at every step."""
    agent, variables = debug_agent
    ac = agent.actor_critic
    frames = jax.random.uniform(jax.random.key(2), (4, 6, 16, 16, 3), minval=-1, maxval=1)
    act = jnp.full((4, 6), 2)
    rew, zeros = jnp.ones((4, 6)), jnp.zeros((4, 6), jnp.int32)

    def outputs(params):
        out = ac.burn_in({"params": params, "buffers": {}}, frames[:, :1], ac.initial_state(4))

        def step(hx_cx, obs):
            o = ac.predict_act_value({"params": params, "buffers": {}}, obs, hx_cx)
            return o.hx_cx, (o.logits_act, o.val)

        _, (logits, val) = jax.lax.scan(step, out.hx_cx, frames.swapaxes(0, 1))
        return logits.swapaxes(0, 1), val.swapaxes(0, 1)

    def loss_fn(params, buffers, batch, key):
        logits, val = outputs(params)
        return ac.loss(logits, val, act, rew, zeros, zeros, jnp.zeros((4, 6)))

    optimizer = steps.make_optimizer(lr=1e-3, weight_decay=0.0, eps=1e-8, warmup_steps=0, max_grad_norm=100.0)
    state = steps.TrainState.create(variables["actor_critic"], optimizer)
    new_state, metrics = jax.jit(steps.make_update(loss_fn, optimizer))(state, None, jax.random.key(0))
    before = jax.nn.softmax(outputs(state.params)[0])[..., 2]
    after = jax.nn.softmax(outputs(new_state.params)[0])[..., 2]
    np.testing.assert_allclose(before, 0.25, rtol=1e-6)
    assert np.all(after > before + 1e-4), after
    assert float(metrics["loss_values"]) > 0 and float(metrics["policy_entropy"]) == pytest.approx(2.0)
