import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diamond_jax import imagination
from diamond_jax.imagination import ActorCriticInputs, InitialConditions
from diamond_jax.training import steps

B, N, K, SIZE, HORIZON = 4, 4, 2, 16, 5


def make_pool(key, b=B, k=K):
    obs = jax.random.uniform(key, (b, k, N, SIZE, SIZE, 3), minval=-1, maxval=1)
    act = jax.random.randint(jax.random.fold_in(key, 1), (b, k, N), 0, 4)
    return InitialConditions(obs, act)


@pytest.fixture(scope="module")
def world(debug_agent):
    """The debug agent with its reward/end head at zero: every step ends with probability 1/2, so both ends
    and continuations happen in a short rollout."""
    agent, variables = debug_agent
    head = variables["rew_end_model"]["params"]["head_2"]
    rew_end = {"params": dict(variables["rew_end_model"]["params"], head_2={"kernel": jnp.zeros_like(head["kernel"])}),
               "buffers": {}}
    variables = dict(variables, rew_end_model=rew_end)
    first = imagination.burn_in(agent, variables, jax.tree.map(lambda x: x[:, 0], make_pool(jax.random.key(100))))
    rollout = jax.jit(functools.partial(imagination.rollout, agent, horizon=HORIZON))
    return agent, variables, imagination.initial_state(first), rollout


def test_shapes_and_dtypes(world):
    agent, variables, state, rollout = world
    traj, new_state = rollout(variables, state, make_pool(jax.random.key(1)), jax.random.key(2))
    chex.assert_shape([traj.obs, traj.next_obs], (B, HORIZON, SIZE, SIZE, 3))
    chex.assert_shape([traj.act, traj.rew, traj.end, traj.trunc, traj.val, traj.val_bootstrap], (B, HORIZON))
    chex.assert_shape(traj.logits_act, (B, HORIZON, 4))
    assert traj.act.dtype == jnp.int32 and traj.end.dtype == jnp.int32 and traj.rew.dtype == jnp.float32
    assert set(np.unique(traj.rew)) <= {-1.0, 0.0, 1.0} and set(np.unique(traj.end)) <= {0, 1}
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    levels = (np.asarray(traj.next_obs) + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_deterministic_per_key(world):
    agent, variables, state, rollout = world
    pool = make_pool(jax.random.key(1))
    a = rollout(variables, state, pool, jax.random.key(5))
    b = rollout(variables, state, pool, jax.random.key(5))
    c = rollout(variables, state, pool, jax.random.key(6))
    chex.assert_trees_all_equal(a, b)
    assert np.mean(np.asarray(a[0].next_obs) != np.asarray(c[0].next_obs)) > 0.5


def test_rows_restart_exactly_where_an_end_or_truncation_was_sampled(world):
    agent, variables, state, rollout = world
    checked = {"end": 0, "trunc": 0, "continue": 0}
    for r in range(4):  # several rollouts in a row: the state carries over
        pool = make_pool(jax.random.key(10 + r))
        traj, next_state = rollout(variables, state, pool, jax.random.key(20 + r))
        t_obs, t_next = np.asarray(traj.obs), np.asarray(traj.next_obs)
        end, trunc = np.asarray(traj.end), np.asarray(traj.trunc)
        ep_len = np.asarray(state.ep_len).copy()
        restarts = np.zeros(B, int)
        for t in range(HORIZON):
            ep_len += 1
            # A truncation exactly when the row has been imagined for `horizon` steps since its restart.
            np.testing.assert_array_equal(trunc[:, t], ep_len >= HORIZON)
            dead = (end[:, t] + trunc[:, t]) > 0
            following = t_obs[:, t + 1] if t + 1 < HORIZON else np.asarray(next_state.obs[:, -1])
            for i in range(B):
                if dead[i]:
                    # The row restarts from its next fresh initial condition: its last frame is the new current one.
                    expected = np.asarray(pool.obs[i, restarts[i] % K, -1])
                    restarts[i] += 1
                    checked["end" if end[i, t] else "trunc"] += 1
                else:
                    expected = t_next[i, t]
                    checked["continue"] += 1
                np.testing.assert_array_equal(following[i], expected)
            ep_len[dead] = 0
        np.testing.assert_array_equal(next_state.ep_len, ep_len)
        state = next_state
    assert min(checked.values()) > 0, checked


def burnt_in_by_hand(agent, variables, obs, act):
    """Both LSTMs stepped one frame at a time from zero states over initial conditions obs [b, N, ...], act
    [b, N]: the reward/end model over the N - 1 transitions, the actor-critic over the frames before the last.
    Returns (rew_end_hx_cx, ac_hx_cx)."""
    ac, rew_end = agent.actor_critic, agent.rew_end_model
    ac_hx_cx, rew_end_hx_cx = ac.initial_state(len(act)), rew_end.initial_state(len(act))
    for t in range(N - 1):
        ac_hx_cx = ac.predict_act_value(variables["actor_critic"], obs[:, t], ac_hx_cx).hx_cx
        *_, rew_end_hx_cx = rew_end.predict_rew_end(variables["rew_end_model"], obs[:, t:t + 1], act[:, t:t + 1],
                                                    obs[:, t + 1:t + 2], rew_end_hx_cx)
    return rew_end_hx_cx, ac_hx_cx


def test_restarted_rows_carry_their_burnt_in_states(world):
    """A row that restarts at the rollout's last step leaves it with the frames, actions and LSTM states of the
    pool entry it restarted from, the states burnt in frame by frame."""
    agent, variables, state, rollout = world
    pool = make_pool(jax.random.key(3))
    traj, next_state = rollout(variables, state, pool, jax.random.key(4))
    dead_last = (np.asarray(traj.end[:, -1]) + np.asarray(traj.trunc[:, -1])) > 0
    assert dead_last.any()
    num_restarts = (np.asarray(traj.end) + np.asarray(traj.trunc) > 0).sum(axis=1)
    rows = np.flatnonzero(dead_last)
    entry = (num_restarts[rows] - 1) % K  # restarts use the row's pool entries in turn
    init_obs, init_act = pool.obs[rows, entry], pool.act[rows, entry]
    rew_end_hx_cx, ac_hx_cx = burnt_in_by_hand(agent, variables, init_obs, init_act)
    for got, expected in [(next_state.rew_end_hx_cx, rew_end_hx_cx), (next_state.ac_hx_cx, ac_hx_cx)]:
        for got_part, expected_part in zip(got, expected):  # hx and cx
            np.testing.assert_allclose(np.asarray(got_part)[rows], expected_part, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(next_state.obs)[rows], init_obs)
    np.testing.assert_array_equal(np.asarray(next_state.act)[rows], init_act)
    np.testing.assert_array_equal(np.asarray(next_state.ep_len)[rows], 0)
    # The states are not trivially equal to zero states, so the comparison means something.
    assert np.abs(np.asarray(ac_hx_cx[1])).max() > 1e-3 and np.abs(np.asarray(rew_end_hx_cx[1])).max() > 1e-3


def test_policy_and_value_start_at_zero(world):
    agent, variables, state, rollout = world
    traj, _ = rollout(variables, state, make_pool(jax.random.key(1)), jax.random.key(2))
    np.testing.assert_array_equal(traj.logits_act, 0.0)
    np.testing.assert_array_equal(traj.val, 0.0)
    np.testing.assert_array_equal(traj.val_bootstrap, 0.0)


def test_no_recompilation_across_rollouts(world):
    agent, variables, state, _ = world

    @jax.jit
    @chex.assert_max_traces(n=1)
    def rollout(variables, state, pool, key):
        return imagination.rollout(agent, variables, state, pool, key, HORIZON)

    for r in range(3):
        _, state = rollout(variables, state, make_pool(jax.random.key(r)), jax.random.key(r))


def test_actor_critic_update_through_imagination(world, debug_config):
    """The update differentiates the actor-critic only; the world model's variables pass through untouched,
    and the imagined state comes back for the next update."""
    agent, variables, state, rollout = world
    ac_config = debug_config.actor_critic
    optimizer = steps.make_optimizer(ac_config.optimizer.lr, 0.0, 1e-8, 0, 100.0)
    update = jax.jit(steps.make_update(imagination.make_actor_critic_loss(agent, HORIZON), optimizer,
                                       has_output=True))
    train_state = steps.TrainState.create(variables["actor_critic"], optimizer)
    world_model = {k: variables[k] for k in ("denoiser", "rew_end_model")}
    inputs = ActorCriticInputs(state, make_pool(jax.random.key(7)), world_model)
    new_train_state, metrics, next_state = update(train_state, inputs, jax.random.key(8))
    chex.assert_trees_all_equal_shapes_and_dtypes(next_state, state)
    assert float(metrics["grad_norm_before_clip"]) > 0
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), train_state.params, new_train_state.params)
    assert changed["actor_linear"]["kernel"] and changed["critic_linear"]["kernel"]
    # Same key and inputs: the same imagined state as a plain rollout with the old parameters.
    _, expected_state = rollout(variables, state, inputs.pool, jax.random.key(8))
    chex.assert_trees_all_close(next_state, expected_state, atol=1e-5)


def test_the_replayed_loss_and_gradient_equal_differentiating_the_rollout(world):
    """The update's loss (a gradient-free rollout, then the actor-critic recomputed along it) has the value and
    the gradient of the direct formulation, the actor-critic's parameters live inside the rollout."""
    agent, variables, state, _ = world
    ac = variables["actor_critic"]
    # Non-zero heads, so that the policy and values (and their gradients) are not trivially zero.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "linear" in str(p) else x,
        ac["params"])
    pool = make_pool(jax.random.key(11))
    world_model = {k: variables[k] for k in ("denoiser", "rew_end_model")}
    inputs = ActorCriticInputs(state, pool, world_model)
    key = jax.random.key(12)
    loss_fn = imagination.make_actor_critic_loss(agent, HORIZON)

    def direct(params):
        traj, _ = imagination.rollout(agent, dict(world_model, actor_critic={"params": params, "buffers": {}}),
                                      state, pool, key, HORIZON)
        assert traj.restart.shape == (B, HORIZON)
        return agent.actor_critic.loss(traj.logits_act, traj.val, traj.act, traj.rew, traj.end, traj.trunc,
                                       traj.val_bootstrap)[0], traj

    (loss, traj), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
    assert int(jnp.sum(traj.restart >= 0)) > 0  # the comparison covers restarts
    (replayed, _), replayed_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, {}, inputs, key)
    np.testing.assert_allclose(replayed, loss, rtol=1e-5)
    chex.assert_trees_all_close(replayed_grads, grads, atol=1e-6, rtol=1e-4)
