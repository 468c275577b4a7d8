"""The three training phases as compiled programs, each update sampling its own batch from the replay dataset
on the device, so that no batch crosses the host.

A compiled call runs either `steps_per_call` updates in one `lax.scan` (GPU, TPU: one launch for many updates)
or one update without any loop (CPU). XLA's CPU backend differentiates convolutions inside a loop 10-70x
slower than outside one (one 3x3 convolution's gradient: 0.32 s alone, 23 s inside `lax.scan(length=1)`), so
on a CPU the host loops over single-update calls, which run at the rate of a lone jitted update.

Every update's key is fold_in(phase key, update index): the same updates draw the same numbers however the
phase is cut into calls, which is what lets a resumed run match an uninterrupted one exactly.
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diamond_jax import imagination
from diamond_jax.agent import Agent, AgentVariables
from diamond_jax.data.batch import Batch
from diamond_jax.data.replay import DeviceReplay
from diamond_jax.data.sampling import sample_segments
from diamond_jax.imagination import ActorCriticInputs, ImaginationState, InitialConditions
from diamond_jax.training import parallel, steps
from diamond_jax.training.steps import TrainState

Metrics = Dict[str, jax.Array]


class LatentReplay(NamedTuple):
    """What a latent agent's denoiser phase samples from: the replay's frames, and the autoencoder that encodes
    them (training/latent_agent.py)."""

    replay: DeviceReplay
    frozen: AgentVariables  # {"autoencoder": ...}


def batch_sampler(config, name: str, agent: Optional[Agent] = None) -> Callable[[Any, jax.Array], Batch]:
    """Segments for one model, with the official lengths and padding rules: sample(replay, key). A latent
    agent's denoiser samples from a LatentReplay, and its batches hold the frames' latents."""
    t = config[name].training
    n = config.denoiser.inner_model.num_steps_conditioning
    if name == "denoiser":
        seq_length, beyond_end = n + 1 + t.num_autoregressive_steps, False
    else:
        seq_length, beyond_end = t.seq_length, True
    sample = functools.partial(sample_segments, batch_size=t.batch_size, seq_length=seq_length,
                               sample_weights=tuple(t.sample_weights), can_sample_beyond_end=beyond_end,
                               include_final_frame=name == "denoiser" and t.include_final_frame)
    if name != "denoiser" or agent is None or not agent.is_latent:
        return sample

    def sample_latents(data: LatentReplay, key: jax.Array) -> Batch:
        batch = sample(data.replay, key)
        return batch._replace(obs=agent.encode(data.frozen, batch.obs))

    return sample_latents


def initial_conditions_sampler(config, num_rows: int) -> Callable[[DeviceReplay, jax.Array], InitialConditions]:
    """num_steps_conditioning real frames and actions per row, padding only before an episode's start."""
    n = config.denoiser.inner_model.num_steps_conditioning
    weights = tuple(config.actor_critic.training.sample_weights)

    def sample(replay: DeviceReplay, key: jax.Array) -> InitialConditions:
        batch = sample_segments(replay, key, num_rows, n, weights, False)
        return InitialConditions(batch.obs, batch.act)

    return sample


def use_scan(phase_loop: str, platform: str) -> bool:
    """Whether a compiled call loops over its updates with `lax.scan` (config.training.phase_loop)."""
    if phase_loop == "auto":
        return platform != "cpu"
    return phase_loop == "scan"


def _updates(body, carry, num_steps: int, scan: bool):
    """body(carry, i) for i < num_steps, outputs stacked: a `lax.scan`, or (scan=False, one update) the body
    alone, its outputs given the scan's leading axis so that callers see one layout."""
    if scan:
        return jax.lax.scan(body, carry, jnp.arange(num_steps))
    if num_steps != 1:
        raise ValueError(f"a phase without scan runs one update per call, not {num_steps}")
    carry, out = body(carry, jnp.int32(0))
    return carry, jax.tree.map(lambda x: x[None], out)


def _compile(chunk, mesh: Mesh, batched: Tuple[bool, ...], batched_outputs: Tuple[bool, ...],
             donate: Tuple[int, ...], num_seeds: Optional[int]):
    """jit(chunk) with its arguments and outputs replicated, or split over the data axis where `batched` says
    (rows of imagined environments). With num_seeds, chunk is vmapped over a leading seed axis of every argument
    but the last (first_step, shared by the seeds) and of every output: a seed group's one program for all its
    seeds (training/group.py)."""
    rep = parallel.replicated(mesh)
    data = parallel.seeds_data_sharded(mesh) if num_seeds else parallel.data_sharded(mesh)
    if num_seeds:
        chunk = jax.vmap(chunk, in_axes=(0,) * (len(batched) - 1) + (None,))
    return jax.jit(chunk, in_shardings=tuple(data if b else rep for b in batched),
                   out_shardings=tuple(data if b else rep for b in batched_outputs), donate_argnums=donate)


def make_model_phase(update, sample_batch, mesh: Mesh, num_steps: int, scan: bool = True,
                     num_seeds: Optional[int] = None):
    """chunk(state, replay, key, first_step) -> (state, metrics stacked over num_steps updates); replay is what
    sample_batch samples from (a DeviceReplay, or a latent agent's LatentReplay). With num_seeds, state, replay,
    key and the metrics have a leading seed axis."""
    data = parallel.data_sharded(mesh)

    def chunk(state: TrainState, replay: DeviceReplay, key: jax.Array, first_step: jax.Array):
        def body(state, i):
            key_sample, key_update = jax.random.split(jax.random.fold_in(key, first_step + i))
            batch = jax.lax.with_sharding_constraint(sample_batch(replay, key_sample), data)
            return update(state, batch, key_update)

        return _updates(body, state, num_steps, scan)

    return _compile(chunk, mesh, (False,) * 4, (False, False), (0,), num_seeds)


def make_actor_critic_phase(agent: Agent, config, optimizer, mesh: Mesh, num_steps: int, scan: bool = True,
                            num_seeds: Optional[int] = None):
    """chunk(state, imagined, world_model, replay, key, first_step) -> (state, imagined, metrics): updates of
    the actor-critic, each through one imagined rollout continuing the imagined environments' state. With
    num_seeds, every argument but first_step and every output has a leading seed axis."""
    data = parallel.data_sharded(mesh)
    b = config.actor_critic.training.batch_size
    k = config.world_model_env.initial_conditions_per_row
    sample_pool = initial_conditions_sampler(config, b * k)
    update = steps.make_update(imagination.make_actor_critic_loss(agent, config.world_model_env.horizon), optimizer,
                               has_output=True)

    def chunk(state: TrainState, imagined: ImaginationState, world_model, replay: DeviceReplay, key: jax.Array,
              first_step: jax.Array):
        def body(carry, i):
            state, imagined = carry
            key_pool, key_update = jax.random.split(jax.random.fold_in(key, first_step + i))
            pool = jax.tree.map(lambda x: x.reshape((b, k) + x.shape[1:]), sample_pool(replay, key_pool))
            inputs = ActorCriticInputs(imagined, jax.lax.with_sharding_constraint(pool, data), world_model)
            state, metrics, imagined = update(state, inputs, key_update)
            return (state, jax.lax.with_sharding_constraint(imagined, data)), metrics

        (state, imagined), metrics = _updates(body, (state, imagined), num_steps, scan)
        return state, imagined, metrics

    return _compile(chunk, mesh, (False, True, False, False, False, False), (False, True, False), (0, 1),
                    num_seeds)


def make_phase(agent: Agent, config, name: str, optimizer, mesh: Mesh, num_steps: int, scan: bool,
               num_seeds: Optional[int] = None):
    """The compiled call of one model's phase as training runs it: num_steps updates (1 without scan).
    denoiser / rew_end_model: chunk(state, replay, key, first_step) -> (state, metrics), replay a LatentReplay
    for a latent agent's denoiser;
    actor_critic: chunk(state, imagined, world_model, replay, key, first_step) -> (state, imagined, metrics).
    With num_seeds: the same for a seed group, every argument but first_step stacked over the seeds."""
    if name == "actor_critic":
        return make_actor_critic_phase(agent, config, optimizer, mesh, num_steps, scan=scan, num_seeds=num_seeds)
    update = steps.make_update(getattr(agent, name).loss, optimizer)
    return make_model_phase(update, batch_sampler(config, name, agent), mesh, num_steps, scan=scan,
                            num_seeds=num_seeds)


def make_imagination_start(agent: Agent, config, mesh: Mesh):
    """start(variables, replay, key) -> ImaginationState: every row at a fresh, burnt-in initial condition."""
    sample = initial_conditions_sampler(config, config.actor_critic.training.batch_size)

    def start(variables, replay: DeviceReplay, key: jax.Array) -> ImaginationState:
        return imagination.initial_state(imagination.burn_in(agent, variables, sample(replay, key)))

    return jax.jit(start, out_shardings=parallel.data_sharded(mesh))


def make_imagined_rollout(agent: Agent, config, mesh: Mesh, num_rows: int):
    """rollout(variables, replay, key) -> Trajectory from fresh initial conditions, for videos of imagination."""
    horizon = config.world_model_env.horizon
    sample = initial_conditions_sampler(config, num_rows)

    def run(variables, replay: DeviceReplay, key: jax.Array) -> imagination.Trajectory:
        key_start, key_pool, key_rollout = jax.random.split(key, 3)
        state = imagination.initial_state(imagination.burn_in(agent, variables, sample(replay, key_start)))
        pool = jax.tree.map(lambda x: x[:, None], sample(replay, key_pool))
        return imagination.rollout(agent, variables, state, pool, key_rollout, horizon)[0]

    return jax.jit(run, out_shardings=parallel.replicated(mesh))


def first_non_finite(values: jax.Array) -> Tuple[bool, int]:
    """(all finite, index of the first non-finite value) of a 1-d array of losses."""
    finite = jnp.isfinite(values)
    return bool(jnp.all(finite)), int(jnp.argmin(finite))


def mean_metrics(metrics: Metrics) -> Dict[str, Any]:
    """Chunk means of scalar metrics; counts (confusion matrices) are summed."""
    out = {}
    for name, value in jax.device_get(metrics).items():
        out[name] = value.sum(axis=0) if name.startswith("confusion") else float(value.mean())
    return out
