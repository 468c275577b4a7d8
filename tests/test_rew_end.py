import jax
import jax.numpy as jnp
import numpy as np

from diamond_jax.data.batch import Batch


def make_batch(key, b=3, t=6, size=16):
    keys = jax.random.split(key, 4)
    obs = jax.random.uniform(keys[0], (b, t, size, size, 3), minval=-1, maxval=1)
    act = jax.random.randint(keys[1], (b, t), 0, 4)
    rew = jax.random.choice(keys[2], jnp.array([-3.0, 0.0, 0.0, 5.0]), (b, t))
    end = jnp.zeros((b, t), jnp.int32).at[1, 3].set(1)
    mask = jnp.ones((b, t), bool).at[1, 4:].set(False).at[2, :2].set(False)
    return Batch(obs, act, rew, end, jnp.zeros((b, t), jnp.int32), mask)


def test_shapes_dtypes_and_carried_state(debug_agent):
    agent, variables = debug_agent
    model, v = agent.rew_end_model, variables["rew_end_model"]
    batch = make_batch(jax.random.key(0))
    logits_rew, logits_end, (hx, cx) = model.predict_rew_end(v, batch.obs[:, :-1], batch.act[:, :-1], batch.obs[:, 1:])
    assert logits_rew.shape == (3, 5, 3) and logits_end.shape == (3, 5, 2) and hx.shape == (3, model.lstm_dim)
    assert logits_rew.dtype == jnp.float32 and cx.dtype == jnp.float32
    # Two calls with the state carried over equal one call over the whole sequence.
    first = model.predict_rew_end(v, batch.obs[:, :2], batch.act[:, :2], batch.obs[:, 1:3])
    second = model.predict_rew_end(v, batch.obs[:, 2:-1], batch.act[:, 2:-1], batch.obs[:, 3:], first[2])
    np.testing.assert_allclose(jnp.concatenate([first[0], second[0]], axis=1), logits_rew, atol=1e-5)
    np.testing.assert_allclose(second[2][0], hx, atol=1e-5)


def test_loss_is_masked_cross_entropy_on_reward_sign_and_end(debug_agent):
    agent, variables = debug_agent
    model, v = agent.rew_end_model, variables["rew_end_model"]
    batch = make_batch(jax.random.key(1))
    loss, metrics = jax.jit(model.loss)(v["params"], v["buffers"], batch, jax.random.key(0))
    logits_rew, logits_end, _ = model.predict_rew_end(v, batch.obs[:, :-1], batch.act[:, :-1], batch.obs[:, 1:])
    mask = np.asarray(batch.mask_padding[:, :-1])
    rew_class = np.sign(np.asarray(batch.rew[:, :-1])).astype(int) + 1
    end_class = np.asarray(batch.end[:, :-1])

    def ce(logits, target):
        logits = np.asarray(logits, np.float64)
        log_z = np.log(np.exp(logits).sum(-1))
        nll = log_z - np.take_along_axis(logits, target[..., None], -1)[..., 0]
        return nll[mask].mean()

    np.testing.assert_allclose(metrics["loss_rew"], ce(logits_rew, rew_class), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_end"], ce(logits_end, end_class), rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["loss_rew"] + metrics["loss_end"], rtol=1e-6)
    assert int(metrics["confusion_rew"].sum()) == mask.sum() == int(metrics["confusion_end"].sum())
    np.testing.assert_array_equal(np.asarray(metrics["confusion_end"]).sum(1), np.bincount(end_class[mask], minlength=2))


def test_loss_ignores_padded_steps(debug_agent):
    agent, variables = debug_agent
    model, v = agent.rew_end_model, variables["rew_end_model"]
    batch = make_batch(jax.random.key(2))
    loss = jax.jit(model.loss)
    a, _ = loss(v["params"], v["buffers"], batch, jax.random.key(0))
    # Row 1 is padding from step 4 on (its last real transition is 3 -> 4), row 2 before step 2.
    changed = batch._replace(rew=batch.rew.at[1, 4:].set(7.0).at[2, :2].set(-7.0),
                             end=batch.end.at[1, 5].set(1), obs=batch.obs.at[1, 5].set(0.3),
                             act=batch.act.at[1, 4:].set(3))
    b, _ = loss(v["params"], v["buffers"], changed, jax.random.key(0))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    c, _ = loss(v["params"], v["buffers"], batch._replace(rew=batch.rew.at[0, 0].set(-1.0 - batch.rew[0, 0])),
                jax.random.key(0))
    assert float(c) != float(a)
