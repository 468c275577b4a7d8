import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diamond_jax.models.actor_critic import ActorCritic, compute_lambda_returns
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


def test_loss_terms_and_gradients_equal_a_numpy_computation():
    """Every term of the loss, and its gradients, in numpy: with lambda-returns G and advantages A = G - V
    (both constants), loss = mean(-log pi(a) A) + w_v mean((V - G)^2) - w_e H, H the mean policy entropy."""
    gamma, lambda_, w_v, w_e = 0.9, 0.8, 0.7, 0.2  # a large entropy weight, so that its term shows clearly
    ac = ActorCritic(num_actions=3, gamma=gamma, lambda_=lambda_, weight_value_loss=w_v, weight_entropy_loss=w_e)
    rng = np.random.default_rng(0)
    b, t = 3, 6
    logits = rng.normal(size=(b, t, 3)) * 2
    val, val_bootstrap = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    act = rng.integers(0, 3, (b, t))
    rew = rng.choice([-2.0, 0.0, 0.5], (b, t))
    end = np.zeros((b, t), np.int32)
    end[0, 2] = 1
    trunc = np.zeros((b, t), np.int32)
    trunc[1, 3] = 1

    returns = lambda_returns_loop(rew, end, trunc, val_bootstrap, gamma, lambda_)
    advantage = returns - val
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(log_p)
    entropy_rows = -(p * log_p).sum(-1)
    log_p_act = np.take_along_axis(log_p, act[..., None], -1)[..., 0]
    expected = {
        "loss_actions": np.mean(-log_p_act * advantage),
        "loss_values": w_v * np.mean((val - returns) ** 2),
        "loss_entropy": -w_e * entropy_rows.mean(),
        "policy_entropy": entropy_rows.mean() / np.log(2),
    }
    expected["loss_total"] = expected["loss_actions"] + expected["loss_values"] + expected["loss_entropy"]
    # d/dz_k of -log pi(a) = p_k - [k = a]; of H_row = -p_k (log p_k + H_row); of (V - G)^2 = 2 (V - G).
    onehot = np.eye(3)[act]
    expected_grad_logits = ((p - onehot) * advantage[..., None] + w_e * p * (log_p + entropy_rows[..., None])) / (b * t)
    expected_grad_val = 2 * w_v * (val - returns) / (b * t)  # the advantages carry no gradient into V

    def loss(logits, val):
        return ac.loss(logits, val, jnp.asarray(act), jnp.asarray(rew), jnp.asarray(end), jnp.asarray(trunc),
                       jnp.asarray(val_bootstrap))

    (total, metrics), (grad_logits, grad_val) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(val, jnp.float32))
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(float(total), expected["loss_total"], rtol=1e-5)
    np.testing.assert_allclose(grad_logits, expected_grad_logits, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grad_val, expected_grad_val, rtol=1e-4, atol=1e-7)


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
