"""The benchmark items: what each one runs, on random data shaped like the real data, placed on the mesh as the
training loop places it (state replicated, batch split over the devices), state donated.

Data are as in the benchmark of the official PyTorch code we compare with: frames are random uint8 pixels
mapped to [-1, 1], actions uniform, rewards in {-1, 0, 1}, no padding and no ends in training segments.
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from diamond_jax import imagination
from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.benchmarking import fixtures
from diamond_jax.benchmarking.timing import Program, next_state, same_args
from diamond_jax.data.batch import Batch, obs_from_frames
from diamond_jax.imagination import ActorCriticInputs, InitialConditions
from diamond_jax.models.actor_critic import ActorCritic, compute_lambda_returns
from diamond_jax.models.denoiser import stack_frames
from diamond_jax.training import parallel, phases, steps

class Setup(NamedTuple):
    config: config_dict.ConfigDict
    agent: Agent
    variables: AgentVariables  # never donated: items donate copies
    mesh: jax.sharding.Mesh
    key: jax.Array
    collection_steps: int  # env steps per repeat of `collection`
    sampling_batches: int  # batches per repeat of `sampling`


class Item(NamedTuple):
    """One benchmark item. Exactly one of `program` (a device program, timed call by call) and `rate` (a
    host-driven loop that reports its own rate, units/s, per repeat) is set."""

    what: str
    reference_item: Optional[str]  # the bench_torch.py item it compares with
    batch_size: int
    units_per_call: float  # throughput = units_per_call / time per call
    unit: str
    program: Optional[Program] = None
    rate: Optional[Callable[[], float]] = None
    reference_note: Optional[str] = None


def _replicated(setup: Setup, tree: Any) -> Any:
    return jax.device_put(tree, parallel.replicated(setup.mesh))


def _sharded(setup: Setup, tree: Any) -> Any:
    return jax.device_put(tree, parallel.data_sharded(setup.mesh))


def _distinct(tree: Any) -> Any:
    """A copy whose leaves are distinct buffers, as a donated argument needs (an initial LSTM state is one
    array of zeros twice)."""
    return jax.tree.map(jnp.copy, tree)


def _batch_size(setup: Setup, model: str) -> int:
    """The training batch size of a model's config section, checked against the mesh."""
    batch_size = setup.config[model].training.batch_size
    parallel.check_batch_size(batch_size, setup.mesh, f"{model}.training.batch_size")
    return batch_size


def random_frames(key: jax.Array, shape) -> jax.Array:
    """Frames in [-1, 1] on the 256 levels of uint8 pixels, like the replay's."""
    return obs_from_frames(jax.random.randint(key, shape, 0, 256).astype(jnp.uint8))


def random_batch(key: jax.Array, batch_size: int, seq_length: int, size: int, num_actions: int) -> Batch:
    key_obs, key_act, key_rew = jax.random.split(key, 3)
    shape = (batch_size, seq_length)
    zeros = jnp.zeros(shape, jnp.int32)
    return Batch(obs=random_frames(key_obs, shape + (size, size, 3)),
                 act=jax.random.randint(key_act, shape, 0, num_actions),
                 rew=jax.random.randint(key_rew, shape, -1, 2).astype(jnp.float32),
                 end=zeros, trunc=zeros, mask_padding=jnp.ones(shape, bool))


def random_initial_conditions(key: jax.Array, batch_size: int, per_row: int, setup: Setup) -> InitialConditions:
    n, size = setup.agent.denoiser.num_steps_conditioning, setup.agent.size
    key_obs, key_act = jax.random.split(key)
    return InitialConditions(random_frames(key_obs, (batch_size, per_row, n, size, size, 3)),
                             jax.random.randint(key_act, (batch_size, per_row, n), 0, setup.agent.num_actions))


def _train_step(setup: Setup, name: str, loss_fn, batch: Any) -> Program:
    optimizer = steps.optimizer_from_config(setup.config[name])
    # A copy: the update donates its state, which would otherwise free the setup's variables.
    state = _distinct(steps.TrainState.create(setup.variables[name], optimizer))
    update = steps.jit_update(steps.make_update(loss_fn, optimizer), setup.mesh)
    args = (_replicated(setup, state), _sharded(setup, batch), _replicated(setup, jax.random.fold_in(setup.key, 1)))
    return Program(update, args, next_state)


def _world_model(setup: Setup) -> AgentVariables:
    return {name: setup.variables[name] for name in ("denoiser", "rew_end_model")}


# ---- Items, in run order.


def inner_model_forward(setup: Setup) -> Item:
    d, size = setup.agent.denoiser, setup.agent.size
    b, n = _batch_size(setup, "denoiser"), d.num_steps_conditioning
    keys = jax.random.split(setup.key, 4)
    rep, data = parallel.replicated(setup.mesh), parallel.data_sharded(setup.mesh)
    args = (_replicated(setup, setup.variables["denoiser"]),
            _sharded(setup, jax.random.normal(keys[0], (b, size, size, 3))),
            _sharded(setup, jax.random.normal(keys[1], (b,))),
            _sharded(setup, stack_frames(random_frames(keys[2], (b, n, size, size, 3))) / d.sigma_data),
            _sharded(setup, jax.random.randint(keys[3], (b, n), 0, d.num_actions)))
    jitted = jax.jit(d.inner_model.apply, in_shardings=(rep, data, data, data, data), out_shardings=data)
    return Item(f"denoiser inner model (U-Net) forward, no gradient, batch {b}, {(n + 1) * 3} input channels",
                "inner_model_forward", b, b, "images/s", program=Program(jitted, args, same_args))


def _denoiser_train_step(setup: Setup, num_predicted: int) -> Item:
    d = setup.agent.denoiser
    b, n = _batch_size(setup, "denoiser"), d.num_steps_conditioning
    seq_length = n + num_predicted
    batch = random_batch(setup.key, b, seq_length, setup.agent.size, d.num_actions)
    return Item(f"denoiser update (loss, gradient, clipping, AdamW) on segments of {seq_length} frames = "
                f"{num_predicted} denoising pass(es), batch {b}",
                "denoiser_train_step" if num_predicted == 1 else "denoiser_train_step_seq6", b, b * num_predicted,
                "predicted frames/s", program=_train_step(setup, "denoiser", d.loss, batch))


def denoiser_train_step(setup: Setup) -> Item:
    return _denoiser_train_step(setup, 1)


def denoiser_train_step_seq6(setup: Setup) -> Item:
    """The update the training loop runs: 1 + num_autoregressive_steps passes (6 frames in the paper)."""
    return _denoiser_train_step(setup, 1 + setup.config.denoiser.training.num_autoregressive_steps)


def rew_end_train_step(setup: Setup) -> Item:
    model = setup.agent.rew_end_model
    b, t = _batch_size(setup, "rew_end_model"), setup.config.rew_end_model.training.seq_length
    batch = random_batch(setup.key, b, t, setup.agent.size, model.num_actions)
    return Item(f"reward/end model update on segments of {t} frames ({t - 1} transitions), batch {b}",
                "rew_end_train_step", b, b * (t - 1), "transitions/s",
                program=_train_step(setup, "rew_end_model", model.loss, batch))


def imagine(agent: Agent, world_model: AgentVariables, state: imagination.ImaginationState, act: jax.Array,
            key: jax.Array):
    """One world-model step for the given actions, the conditioning frames and actions shifted by one, as the
    reference benchmark's `imagine` does around WorldModelEnv's two predict functions."""
    out, state = imagination.world_model_step(agent, world_model, state, act, state.ac_hx_cx, key)
    return state, out.rew, out.end


def imagination_step(setup: Setup) -> Item:
    agent = setup.agent
    b, n, size = _batch_size(setup, "actor_critic"), agent.denoiser.num_steps_conditioning, agent.size
    keys = jax.random.split(setup.key, 3)
    carry = imagination.zero_state(agent, b)._replace(
        obs=random_frames(keys[0], (b, n, size, size, 3)),
        act=jax.random.randint(keys[1], (b, n), 0, agent.num_actions))
    rep, data = parallel.replicated(setup.mesh), parallel.data_sharded(setup.mesh)
    jitted = jax.jit(functools.partial(imagine, agent), in_shardings=(rep, data, data, rep),
                     out_shardings=(data, data, data), donate_argnums=(1,))
    args = (_replicated(setup, _world_model(setup)), _sharded(setup, _distinct(carry)),
            _sharded(setup, jax.random.randint(keys[2], (b,), 0, agent.num_actions)), _replicated(setup, setup.key))
    return Item(f"one imagined step: sampler ({agent.sampler.num_steps_denoising} denoising steps, order "
                f"{agent.sampler.order}) + reward/end model step (LSTM state carried) + reward/end sampling, "
                f"batch {b}, no gradient", "imagination_step", b, b, "imagined frames/s",
                program=Program(jitted, args, lambda args, out: (args[0], out[0]) + args[2:]))


def _imagination_start(setup: Setup, b: int):
    """The rows' imagination state after burning in on random initial conditions, and one fresh initial
    condition per row for the restarts of the next rollout (in steady state each row restarts once per
    rollout, at the horizon, so each rollout burns in b initial conditions, as the reference's does)."""
    key_first, key_pool = jax.random.split(jax.random.fold_in(setup.key, 2))
    first = random_initial_conditions(key_first, b, 1, setup)
    point = jax.jit(functools.partial(imagination.burn_in, setup.agent))(
        setup.variables, jax.tree.map(lambda x: x[:, 0], first))
    return imagination.initial_state(point), random_initial_conditions(key_pool, b, 1, setup)


def imagination_rollout(setup: Setup) -> Item:
    b, horizon = _batch_size(setup, "actor_critic"), setup.config.world_model_env.horizon
    state, pool = _imagination_start(setup, b)
    rep, data = parallel.replicated(setup.mesh), parallel.data_sharded(setup.mesh)
    jitted = jax.jit(functools.partial(imagination.rollout, setup.agent, horizon=horizon),
                     in_shardings=(rep, data, data, rep), out_shardings=(data, data), donate_argnums=(1,))
    args = (_replicated(setup, setup.variables), _sharded(setup, _distinct(state)), _sharded(setup, pool),
            _replicated(setup, setup.key))
    return Item(f"imagination.rollout: burn-in of {b} fresh initial conditions, then {horizon} x [actor-critic step "
                f"+ action sampling + imagined step + restarts], batch {b}, no gradient", "imagination_rollout", b,
                b * horizon, "imagined frames/s",
                program=Program(jitted, args, lambda args, out: (args[0], out[1]) + args[2:]),
                reference_note="the reference's rollout has no burn-in (its state starts from random frames)")


def actor_critic_update(setup: Setup) -> Item:
    config, agent = setup.config, setup.agent
    b, horizon = _batch_size(setup, "actor_critic"), config.world_model_env.horizon
    state, pool = _imagination_start(setup, b)
    optimizer = steps.optimizer_from_config(config.actor_critic)
    update = steps.make_update(imagination.make_actor_critic_loss(agent, horizon), optimizer, has_output=True)
    rep, data = parallel.replicated(setup.mesh), parallel.data_sharded(setup.mesh)
    inputs_sharding = ActorCriticInputs(state=data, pool=data, world_model=rep)
    jitted = steps.jit_update(update, setup.mesh, batch_sharding=inputs_sharding, has_output=True)
    train_state = _distinct(steps.TrainState.create(setup.variables["actor_critic"], optimizer))
    args = (_replicated(setup, train_state),
            jax.device_put(ActorCriticInputs(state, pool, _world_model(setup)), inputs_sharding),
            _replicated(setup, setup.key))
    return Item(f"actor-critic update through a {horizon}-step imagined rollout (burn-in, world model, restarts, "
                f"lambda-returns, losses, gradient through the actor-critic, AdamW), batch {b}",
                "actor_critic_update_full", b, b * horizon, "imagined frames/s",
                program=Program(jitted, args, lambda args, out: (out[0], args[1]._replace(state=out[2]), args[2])),
                reference_note="compares with bench_torch.py's actor_critic_update_full (--extras); its "
                               "actor_critic_update runs no world model and compares with actor_critic_update_stored")


class StoredTrajectory(NamedTuple):
    obs: jax.Array  # [b, T + 1, h, w, 3]: T frames acted on, then the frame after the last action
    rew: jax.Array  # [b, T]
    end: jax.Array  # [b, T]
    trunc: jax.Array  # [b, T], set at the last step


def stored_trajectory_loss(actor_critic: ActorCritic):
    """The actor-critic's loss over stored frames instead of a world model, as bench_torch.py's
    actor_critic_update: the LSTM runs over the T frames, a bootstrap value comes from the last one."""

    def loss_fn(params, buffers, traj: StoredTrajectory, key: jax.Array):
        variables = {"params": params, "buffers": buffers}
        b, t = traj.rew.shape

        # A Python loop, as in imagination.replay_actor_critic: XLA's CPU backend differentiates
        # convolutions inside loops 10-40x slower.
        hx_cx, logits, vals = actor_critic.initial_state(b), [], []
        for i in range(t):
            out = actor_critic.predict_act_value(variables, traj.obs[:, i], hx_cx)
            hx_cx = out.hx_cx
            logits.append(out.logits_act)
            vals.append(out.val)
        last_val = actor_critic.predict_act_value(variables, traj.obs[:, t], hx_cx).val
        logits_act, val = jnp.stack(logits, axis=1), jnp.stack(vals, axis=1)
        act = jax.random.categorical(key, logits_act).astype(jnp.int32)
        val_bootstrap = jax.lax.stop_gradient(jnp.concatenate([val[:, 1:], last_val[:, None]], axis=1))
        return actor_critic.loss(logits_act, val, act, traj.rew, traj.end, traj.trunc, val_bootstrap)

    return loss_fn


def _stored_trajectory(key: jax.Array, b: int, t: int, size: int) -> StoredTrajectory:
    key_obs, key_rew = jax.random.split(key)
    zeros = jnp.zeros((b, t), jnp.int32)
    return StoredTrajectory(random_frames(key_obs, (b, t + 1, size, size, 3)),
                            jax.random.randint(key_rew, (b, t), -1, 2).astype(jnp.float32), zeros,
                            zeros.at[:, -1].set(1))


def actor_critic_update_stored(setup: Setup) -> Item:
    b, horizon = _batch_size(setup, "actor_critic"), setup.config.world_model_env.horizon
    traj = _stored_trajectory(setup.key, b, horizon, setup.agent.size)
    return Item(f"actor-critic update over {horizon} stored random frames + bootstrap frame (no world model), "
                f"batch {b}", "actor_critic_update", b, b * horizon, "trajectory frames/s",
                program=_train_step(setup, "actor_critic", stored_trajectory_loss(setup.agent.actor_critic), traj))


def lambda_returns(setup: Setup) -> Item:
    ac = setup.agent.actor_critic
    b, horizon = _batch_size(setup, "actor_critic"), setup.config.world_model_env.horizon
    key_rew, key_val = jax.random.split(setup.key)
    zeros = jnp.zeros((b, horizon), jnp.int32)
    rew = jax.random.randint(key_rew, (b, horizon), -1, 2).astype(jnp.float32)
    data = parallel.data_sharded(setup.mesh)
    jitted = jax.jit(functools.partial(compute_lambda_returns, gamma=ac.gamma, lambda_=ac.lambda_),
                     in_shardings=data, out_shardings=data)
    args = _sharded(setup, (rew, zeros, zeros.at[:, -1].set(1), jax.random.normal(key_val, (b, horizon))))
    return Item(f"compute_lambda_returns alone, batch {b} x {horizon}", "compute_lambda_returns", b, b * horizon,
                "returns/s", program=Program(jitted, args, same_args))


_REPLAYS: Dict[int, Any] = {}


def _device_replay(setup: Setup):
    """A synthetic replay of the whole budget on the mesh, built once per setup for the three phase items."""
    if id(setup) not in _REPLAYS:
        _REPLAYS.clear()  # one setup at a time: free the previous one's frames
        _REPLAYS[id(setup)] = _replicated(setup, fixtures.synthetic_replay(setup.config).device_replay())
    return _REPLAYS[id(setup)]


def _phase(setup: Setup, name: str) -> Item:
    """One compiled call of a model's phase exactly as the training loop makes it (phases.make_phase): updates
    sampling their batches on the device from a replay of the whole budget; on a CPU one update per call, on
    GPU/TPU `steps_per_call` in a lax.scan (config.training.phase_loop). Compare its time per update with the
    lone update's item: they should match."""
    config, agent = setup.config, setup.agent
    scan = phases.use_scan(config.training.phase_loop, setup.mesh.devices.flat[0].platform)
    n = config.training.steps_per_call if scan else 1
    b = _batch_size(setup, name)
    optimizer = steps.optimizer_from_config(config[name])
    chunk = phases.make_phase(agent, config, name, optimizer, setup.mesh, n, scan)
    state = _replicated(setup, _distinct(steps.TrainState.create(setup.variables[name], optimizer)))
    replay, key, first = _device_replay(setup), _replicated(setup, setup.key), jnp.int32(0)
    if name == "actor_critic":
        imagined = phases.make_imagination_start(agent, config, setup.mesh)(setup.variables, replay, setup.key)
        args = (state, imagined, _replicated(setup, _world_model(setup)), replay, key, first)
        program = Program(chunk, args, lambda args, out: (out[0], out[1]) + args[2:])
    else:
        program = Program(chunk, (state, replay, key, first), next_state)
    loop = f"{n} updates in one lax.scan" if scan else "one update, no loop"
    return Item(f"{name} phase as training runs it: {loop} per compiled call, batches sampled on the device from "
                f"a replay of the whole budget, batch {b}", None, b, n, "updates/s", program=program)


def denoiser_phase(setup: Setup) -> Item:
    return _phase(setup, "denoiser")


def rew_end_phase(setup: Setup) -> Item:
    return _phase(setup, "rew_end_model")


def actor_critic_phase(setup: Setup) -> Item:
    return _phase(setup, "actor_critic")


def collection(setup: Setup) -> Item:
    config, num_steps = setup.config, setup.collection_steps
    return Item(f"fixtures.benchmark_collection: {num_steps} agent steps per repeat of {config.game} in "
                f"{config.collection.train.num_envs} env(s), the policy acting (epsilon-greedy), the replay "
                f"filling; a time per call is per agent step", None, config.collection.train.num_envs, 1,
                "env steps/s", rate=lambda: fixtures.benchmark_collection(config, num_steps))


def sampling(setup: Setup) -> Item:
    config, num_batches = setup.config, setup.sampling_batches
    seq_length = config.rew_end_model.training.seq_length
    batch_size = fixtures.REFERENCE_BATCH_SIZE
    return Item(f"fixtures.benchmark_sampling: {num_batches} batches of {batch_size} segments of "
                f"{seq_length} steps per repeat from a synthetic replay of the whole budget; a time per call is "
                f"per batch", None, batch_size, batch_size, "segments/s",
                rate=lambda: fixtures.benchmark_sampling(config, num_batches))


def _stacked(setup: Setup, tree: Any, num_seeds: int, sharding) -> Any:
    """num_seeds distinct copies of a pytree on a leading seed axis, placed (a seed group's state)."""
    return jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * num_seeds), tree), sharding)


def group_rollout(setup: Setup, num_seeds: int) -> Item:
    """imagination_rollout for a seed group: one program vmapped over num_seeds seeds (training/group.py)."""
    b, horizon = _batch_size(setup, "actor_critic"), setup.config.world_model_env.horizon
    state, pool = _imagination_start(setup, b)
    rep, data = parallel.replicated(setup.mesh), parallel.seeds_data_sharded(setup.mesh)
    rollout = jax.vmap(functools.partial(imagination.rollout, setup.agent, horizon=horizon))
    jitted = jax.jit(rollout, in_shardings=(rep, data, data, rep), out_shardings=(data, data), donate_argnums=(1,))
    args = (_stacked(setup, setup.variables, num_seeds, rep), _stacked(setup, state, num_seeds, data),
            _stacked(setup, pool, num_seeds, data), jax.device_put(jax.random.split(setup.key, num_seeds), rep))
    return Item(f"imagination_rollout of a group of {num_seeds} seeds in one vmapped program: batch {b} per seed; "
                f"the rate counts the frames of all the seeds (per seed: divide by {num_seeds})", None,
                b * num_seeds, b * horizon * num_seeds, "imagined frames/s",
                program=Program(jitted, args, lambda args, out: (args[0], out[1]) + args[2:]))


def group_phase(setup: Setup, name: str, num_seeds: int) -> Item:
    """A model's phase call as a seed group of num_seeds seeds makes it (phases.make_phase with num_seeds)."""
    config, agent = setup.config, setup.agent
    scan = phases.use_scan(config.training.phase_loop, setup.mesh.devices.flat[0].platform)
    n = config.training.steps_per_call if scan else 1
    b = _batch_size(setup, name)
    optimizer = steps.optimizer_from_config(config[name])
    chunk = phases.make_phase(agent, config, name, optimizer, setup.mesh, n, scan, num_seeds=num_seeds)
    rep, data = parallel.replicated(setup.mesh), parallel.seeds_data_sharded(setup.mesh)
    state = _stacked(setup, steps.TrainState.create(setup.variables[name], optimizer), num_seeds, rep)
    replay = _stacked(setup, _device_replay(setup), num_seeds, rep)
    keys, first = jax.device_put(jax.random.split(setup.key, num_seeds), rep), jnp.int32(0)
    if name == "actor_critic":
        imagined = phases.make_imagination_start(agent, config, setup.mesh)(setup.variables, _device_replay(setup),
                                                                             setup.key)
        args = (state, _stacked(setup, imagined, num_seeds, data),
                _stacked(setup, _world_model(setup), num_seeds, rep), replay, keys, first)
        program = Program(chunk, args, lambda args, out: (out[0], out[1]) + args[2:])
    else:
        program = Program(chunk, (state, replay, keys, first), next_state)
    return Item(f"{name} phase of a group of {num_seeds} seeds in one vmapped program, as training/group.py calls "
                f"it: {n} update(s) of every seed per call, batch {b} per seed; the rate counts the updates of all "
                f"the seeds", None, b * num_seeds, n * num_seeds, "seed-updates/s", program=program)


# Group sizes of the seed-group items: rollouts for the scaling with the number of seeds, and the three phases
# for the projection of one game's 5 seeds in one process (benchmarking/report.py).
GROUP_ROLLOUT_SEEDS = (2, 4, 8)
GROUP_PHASE_SEEDS = 5
GROUP_PHASE_ITEMS = {"denoiser": f"denoiser_phase_seeds{GROUP_PHASE_SEEDS}",
                     "rew_end_model": f"rew_end_phase_seeds{GROUP_PHASE_SEEDS}",
                     "actor_critic": f"actor_critic_phase_seeds{GROUP_PHASE_SEEDS}"}

ITEMS: Dict[str, Callable[[Setup], Item]] = {
    "inner_model_forward": inner_model_forward,
    "denoiser_train_step": denoiser_train_step,
    "denoiser_train_step_seq6": denoiser_train_step_seq6,
    "rew_end_train_step": rew_end_train_step,
    "imagination_step": imagination_step,
    "imagination_rollout": imagination_rollout,
    "actor_critic_update": actor_critic_update,
    "actor_critic_update_stored": actor_critic_update_stored,
    "compute_lambda_returns": lambda_returns,
    "denoiser_phase": denoiser_phase,
    "rew_end_phase": rew_end_phase,
    "actor_critic_phase": actor_critic_phase,
    "collection": collection,
    "sampling": sampling,
    **{f"imagination_rollout_seeds{n}": functools.partial(group_rollout, num_seeds=n) for n in GROUP_ROLLOUT_SEEDS},
    **{item: functools.partial(group_phase, name=name, num_seeds=GROUP_PHASE_SEEDS)
       for name, item in GROUP_PHASE_ITEMS.items()},
}
