"""The world model as an environment, and the actor-critic acting in it.

Pure functions, state in and state out, every array with a leading batch axis (one row per imagined
environment), every random draw from an explicit key. A rollout is one `lax.scan` over the horizon around
the sampler. The world model (denoiser and reward/end model) only feeds the actor-critic frames, rewards
and ends; for the actor-critic's update its outputs along the rollout are recomputed as differentiable
functions of its parameters (`replay_actor_critic`). Each step of it is a
`world_model_step`, which also serves whoever else chooses the actions (a player in diamond_jax.play).

As in the official `WorldModelEnv`, a row's episode lasts until the reward/end model samples an end or the
row has been imagined for `horizon` steps (a truncation); the row then restarts from a fresh initial
condition: num_steps_conditioning real frames and actions from the replay, on which both LSTMs are burnt
in. The state persists across rollouts, so a row that restarted mid-rollout goes on into the next one.
Each rollout brings `initial_conditions_per_row` fresh initial conditions per row; a row that restarts more
often than that within one rollout reuses them in turn.
"""

from typing import NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.models.actor_critic import ActorCriticOutput, HxCx
from diamond_jax.models.sampler import sample_next_obs


class InitialConditions(NamedTuple):
    obs: jax.Array  # float32 [b, n, h, w, 3], real frames in [-1, 1] (0 for padding before an episode's start)
    act: jax.Array  # int32 [b, n], the actions taken at those frames


class ResetPoint(NamedTuple):
    """Everything a row needs to restart from an initial condition, with both LSTMs burnt in."""

    obs: jax.Array  # [b, n, h, w, 3] the conditioning frames
    act: jax.Array  # [b, n]
    rew_end_hx_cx: HxCx  # after the n - 1 transitions of the initial condition
    ac_hx_cx: HxCx  # actor-critic state before the last frame
    ac_out: ActorCriticOutput  # actor-critic output at the last frame
    lat: Optional[jax.Array] = None  # a latent agent's [b, n, h / f, w / f, c]: the frames' latents


class ImaginationState(NamedTuple):
    obs: jax.Array  # [b, n, h, w, 3] the last n frames; obs[:, -1] is the current one
    act: jax.Array  # [b, n] the actions taken at them (the last one is replaced by the next action)
    rew_end_hx_cx: HxCx
    ac_hx_cx: HxCx  # actor-critic state before the current frame
    ep_len: jax.Array  # int32 [b] steps imagined since the row's last restart
    # A latent agent's [b, n, h / f, w / f, c]: the latents the denoiser drew (or encoded) for those frames, its
    # context; None for a pixel agent, whose denoiser draws from obs.
    lat: Optional[jax.Array] = None


class Trajectory(NamedTuple):
    """One rollout, [b, T, ...]: at step t the actor-critic saw obs and chose act."""

    obs: jax.Array  # [b, T, h, w, 3]
    act: jax.Array  # int32 [b, T]
    rew: jax.Array  # float32 [b, T] in {-1, 0, 1}
    end: jax.Array  # int32 [b, T]
    trunc: jax.Array  # int32 [b, T]
    logits_act: jax.Array  # [b, T, num_actions]
    val: jax.Array  # [b, T]
    val_bootstrap: jax.Array  # [b, T] value of the frame reached (the final frame where the row restarted)
    next_obs: jax.Array  # [b, T, h, w, 3] the frame reached by the step
    restart: jax.Array  # int32 [b, T] the pool entry the row restarted from after the step, -1 if it went on


def burn_in_actor_critic(agent: Agent, ac_variables, init: InitialConditions) -> Tuple[HxCx, ActorCriticOutput]:
    """The actor-critic's state before the last frame of initial conditions, and its output at that frame,
    from zero states."""
    b, n = init.act.shape
    ac = agent.actor_critic
    zeros = ac.initial_state(b)
    ac_hx_cx = ac.burn_in(ac_variables, init.obs[:, :-1], zeros).hx_cx if n > 1 else zeros
    return ac_hx_cx, ac.predict_act_value(ac_variables, init.obs[:, -1], ac_hx_cx)


def burn_in(agent: Agent, variables: AgentVariables, init: InitialConditions) -> ResetPoint:
    """Burns both LSTMs in on initial conditions: the reward/end model on their n - 1 transitions (no
    gradient), the actor-critic on their frames, from zero states."""
    b, n = init.act.shape
    chex.assert_shape(init.obs, (b, n, agent.size, agent.size, 3))
    *_, rew_end_hx_cx = agent.rew_end_model.predict_rew_end(
        variables["rew_end_model"], init.obs[:, :-1], init.act[:, :-1], init.obs[:, 1:])
    ac_hx_cx, ac_out = burn_in_actor_critic(agent, variables["actor_critic"], init)
    lat = agent.encode(variables, init.obs) if agent.is_latent else None
    return ResetPoint(init.obs, init.act, jax.lax.stop_gradient(rew_end_hx_cx), ac_hx_cx, ac_out, lat)


def initial_state(point: ResetPoint) -> ImaginationState:
    """Rows at the start of an episode, from their reset points."""
    return ImaginationState(point.obs, point.act, point.rew_end_hx_cx, point.ac_hx_cx,
                            jnp.zeros(point.act.shape[0], jnp.int32), point.lat)


def zero_state(agent: Agent, batch_size: int) -> ImaginationState:
    """Rows of zeros with the shapes of an ImaginationState (a placeholder until real initial conditions)."""
    n, size = agent.denoiser.num_steps_conditioning, agent.size
    lat = None
    if agent.is_latent:
        lat = jnp.zeros((batch_size, n, agent.denoised_size, agent.denoised_size, agent.autoencoder.latent_channels))
    return ImaginationState(jnp.zeros((batch_size, n, size, size, 3)), jnp.zeros((batch_size, n), jnp.int32),
                            agent.rew_end_model.initial_state(batch_size),
                            agent.actor_critic.initial_state(batch_size), jnp.zeros((batch_size,), jnp.int32), lat)


def _where_rows(mask: jax.Array, a, b):
    """Row-wise select between two pytrees with a leading batch axis."""
    return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)


def _pick(tree, index: jax.Array):
    """Per row r, entry index[r] of a pytree whose leaves are [b, K, ...]."""
    return jax.tree.map(lambda x: jax.vmap(lambda x_r, i: x_r[i])(x, index), tree)


class WorldModelStep(NamedTuple):
    next_obs: jax.Array  # [b, h, w, 3] the frame reached, in [-1, 1] on the 256-level grid
    rew: jax.Array  # float32 [b] in {-1, 0, 1}, sampled from the reward/end model
    end: jax.Array  # int32 [b], sampled from the reward/end model


def world_model_step(agent: Agent, variables: AgentVariables, state: ImaginationState, act: jax.Array,
                     ac_hx_cx: HxCx, key: jax.Array) -> Tuple[WorldModelStep, ImaginationState]:
    """One imagined step of every row, whoever chose the actions act [b] taken at the current frames.

    Returns the frames reached with their sampled rewards and ends, and the state continued from there
    (never restarted: what an end or a horizon means is the caller's choice). ac_hx_cx is the actor-critic's
    state after the current frame; the continued state carries it, since its frame is the next current one.
    """
    key_obs, key_rew, key_end = jax.random.split(key, 3)
    act_buffer = state.act.at[:, -1].set(act)
    drawn = sample_next_obs(agent.denoiser, variables["denoiser"], key_obs,
                            state.lat if agent.is_latent else state.obs, act_buffer, agent.sampler)
    next_obs = agent.decode(variables, drawn)  # the reward/end model and the actor-critic see frames
    logits_rew, logits_end, rew_end_hx_cx = agent.rew_end_model.predict_rew_end(
        variables["rew_end_model"], state.obs[:, -1:], act[:, None], next_obs[:, None], state.rew_end_hx_cx)
    rew = (jax.random.categorical(key_rew, logits_rew[:, 0]) - 1).astype(jnp.float32)
    end = jax.random.categorical(key_end, logits_end[:, 0]).astype(jnp.int32)
    continued = ImaginationState(
        obs=_shift(state.obs, next_obs),
        act=jnp.roll(act_buffer, -1, axis=1),
        rew_end_hx_cx=rew_end_hx_cx,
        ac_hx_cx=ac_hx_cx,
        ep_len=state.ep_len + 1,
        lat=_shift(state.lat, drawn) if agent.is_latent else None,
    )
    return WorldModelStep(next_obs, rew, end), continued


def _shift(past: jax.Array, new: jax.Array) -> jax.Array:
    """[b, n, ...] without its oldest entry, with new [b, ...] appended."""
    return jnp.concatenate([past[:, 1:], new[:, None]], axis=1)


def rollout(agent: Agent, variables: AgentVariables, state: ImaginationState, pool: InitialConditions,
            key: jax.Array, horizon: int) -> Tuple[Trajectory, ImaginationState]:
    """Imagines `horizon` steps of every row, the actor-critic acting.

    pool: fresh initial conditions for the restarts of this rollout, [b, K, n, ...] (K per row).
    Returns the trajectory ([b, horizon, ...]) and the state to continue from.
    """
    b, n = state.act.shape
    k = pool.act.shape[1]
    chex.assert_shape(pool.act, (b, k, n))
    ac, ac_vars = agent.actor_critic, variables["actor_critic"]

    flat_pool = jax.tree.map(lambda x: x.reshape((b * k,) + x.shape[2:]), pool)
    points = jax.tree.map(lambda x: x.reshape((b, k) + x.shape[1:]), burn_in(agent, variables, flat_pool))

    # The carried actor-critic state comes from the previous rollout: no gradient flows back into it.
    ac_hx_cx = jax.lax.stop_gradient(state.ac_hx_cx)
    ac_out = ac.predict_act_value(ac_vars, state.obs[:, -1], ac_hx_cx)

    def step(carry, key_t):
        wm, ac_out, num_restarts = carry
        key_act, key_wm = jax.random.split(key_t)
        act = jax.random.categorical(key_act, ac_out.logits_act).astype(jnp.int32)
        out, continued = world_model_step(agent, variables, wm, act, ac_out.hx_cx, key_wm)
        trunc = (continued.ep_len >= horizon).astype(jnp.int32)
        # The actor-critic's next output, and the value of the frame reached: for a row that restarts, the
        # value of its final frame, as the official env loop computes it.
        next_ac_out = ac.predict_act_value(ac_vars, out.next_obs, ac_out.hx_cx)

        dead = (out.end + trunc) > 0
        point = _pick(points, num_restarts % k)
        restarted = initial_state(point)
        traj_t = Trajectory(wm.obs[:, -1], act, out.rew, out.end, trunc, ac_out.logits_act, ac_out.val,
                            next_ac_out.val, out.next_obs, jnp.where(dead, num_restarts % k, -1))
        carry = (_where_rows(dead, restarted, continued), _where_rows(dead, point.ac_out, next_ac_out),
                 num_restarts + dead)
        return carry, traj_t

    carry = (state, ac_out, jnp.zeros(b, jnp.int32))
    (state, _, _), traj = jax.lax.scan(step, carry, jax.random.split(key, horizon))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj), state


class ActorCriticInputs(NamedTuple):
    """What an actor-critic update needs besides its own parameters."""

    state: ImaginationState  # rows sharded over devices
    pool: InitialConditions  # [b, K, ...], rows sharded over devices
    world_model: AgentVariables  # {"denoiser": ..., "rew_end_model": ...} (and a latent agent's "autoencoder")


def replay_actor_critic(agent: Agent, ac_variables, state: ImaginationState, pool: InitialConditions,
                        traj: Trajectory) -> Tuple[jax.Array, jax.Array]:
    """The actor-critic's logits [b, T, A] and values [b, T] along a rollout, recomputed from its frames and
    restarts as differentiable functions of the actor-critic's variables: the same numbers the rollout
    computed, with the same dependence on the parameters (through the LSTM state and the burn-ins)."""
    b, k = pool.act.shape[:2]
    ac = agent.actor_critic
    flat_pool = jax.tree.map(lambda x: x.reshape((b * k,) + x.shape[2:]), pool)
    _, point_out = burn_in_actor_critic(agent, ac_variables, flat_pool)
    point_out = jax.tree.map(lambda x: x.reshape((b, k) + x.shape[1:]), point_out)
    out = ac.predict_act_value(ac_variables, state.obs[:, -1], jax.lax.stop_gradient(state.ac_hx_cx))
    logits, val = [], []
    # A Python loop over the horizon: only the small actor-critic runs here, and XLA's CPU backend
    # differentiates convolutions inside loops 10-40x slower.
    for t in range(traj.act.shape[1]):
        logits.append(out.logits_act)
        val.append(out.val)
        if t + 1 < traj.act.shape[1]:
            next_out = ac.predict_act_value(ac_variables, traj.next_obs[:, t], out.hx_cx)
            restarted = traj.restart[:, t] >= 0
            out = _where_rows(restarted, _pick(point_out, jnp.maximum(traj.restart[:, t], 0)), next_out)
    return jnp.stack(logits, axis=1), jnp.stack(val, axis=1)


def make_actor_critic_loss(agent: Agent, horizon: int):
    """loss_fn(params, buffers, inputs, key) -> (loss, (metrics, next ImaginationState)): the official
    actor-critic loss on one rollout, differentiable in the actor-critic's parameters only.

    The rollout itself runs without gradients; the actor-critic's outputs are then recomputed along it as
    differentiable functions of its parameters (`replay_actor_critic`), so the backward pass holds only the
    actor-critic, never the world model, and needs no loop over the horizon.
    """

    def loss_fn(params, buffers, inputs: ActorCriticInputs, key: jax.Array):
        ac_variables = {"params": params, "buffers": buffers}
        variables = dict(inputs.world_model, actor_critic=jax.lax.stop_gradient(ac_variables))
        traj, state = rollout(agent, variables, inputs.state, inputs.pool, key, horizon)
        logits_act, val = replay_actor_critic(agent, ac_variables, inputs.state, inputs.pool, traj)
        loss, metrics = agent.actor_critic.loss(logits_act, val, traj.act, traj.rew, traj.end, traj.trunc,
                                                traj.val_bootstrap)
        metrics = dict(metrics, imagined_rew_mean=jnp.mean(traj.rew), imagined_end_rate=jnp.mean(traj.end))
        return loss, (metrics, state)

    return loss_fn
