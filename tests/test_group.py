"""Seed groups (training/group.py): several seeds in one process compute exactly what their single runs compute,
one phase program vmapped over the seeds on one and on two devices, a whole debug group against two single runs,
and a group stopped and resumed."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import minatar
from conftest import stopping_after, with_fields
from diamond_jax.agent import Agent
from diamond_jax.benchmarking.fixtures import synthetic_replay
from diamond_jax.config import ConfigError, validate
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.data.sampling import sample_segments
from diamond_jax.training import group, loop, parallel, phases, steps


def catch_config(**fields):
    return with_fields(minatar.get_config("game=Catch,debug"), **fields)


def test_seeds_are_validated():
    for bad in [(0, 0), (-1,), (1.5,)]:
        with pytest.raises(ConfigError, match="seeds"):
            validate(catch_config(seeds=bad).unlock())
    with pytest.raises(ConfigError, match="latent agent"):
        validate(catch_config(seeds=(0, 1), **{"denoiser.space": "latent", "autoencoder.path": "x"}).unlock())
    member = group.seed_config(catch_config(seeds=(3, 4)), 4)
    assert member.seed == 4 and member.seeds == ()


def test_stacked_replays_sample_what_each_replay_samples(debug_config):
    """Two replays of different capacities: padded and stacked, a vmapped draw gives each seed its own draw."""
    small = synthetic_replay(debug_config, seed=0)
    size = debug_config.env.size
    big = ReplayDataset(1, (size, size, 3), initial_capacity=1024, initial_episode_capacity=256)
    rng = np.random.default_rng(1)
    for k in [40, 3000, 7] + [3] * 300:  # grows its capacities beyond the small one's
        obs = rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8)
        end = np.zeros(k, bool)
        end[-1] = True
        big.append(0, obs, rng.integers(0, 3, k).astype(np.int32), np.zeros(k, np.float32), end, np.zeros(k, bool),
                   obs[0])
    replays = [small.device_replay(), big.device_replay()]
    assert replays[0].frames.shape[1] < replays[1].frames.shape[1]
    assert replays[0].ep_length.shape[0] < replays[1].ep_length.shape[0]
    keys = [jax.random.key(5), jax.random.key(6)]
    sample = jax.jit(sample_segments, static_argnums=(2, 3, 4, 5))
    draw = jax.jit(jax.vmap(lambda r, k: sample_segments(r, k, 16, 5, (0.1, 0.1, 0.1, 0.7), False)))
    stacked = draw(group.stack_replays(replays), jnp.stack(keys))
    for i in range(2):
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], stacked),
                                    sample(replays[i], keys[i], 16, 5, (0.1, 0.1, 0.1, 0.7), False))


@pytest.mark.parametrize("name, num_devices", [("denoiser", 1)])
def test_one_vmapped_phase_call_equals_each_seeds_call(debug_config, name, num_devices):
    """Two seeds' states, keys and replays through one vmapped phase program against each seed's own program: the
    same parameters, metrics and imagination states up to float32 rounding (XLA sums the gradients of the vmapped
    program in another order: differences of a few units in the last place, 6e-9 on Adam's moments here). One
    device here; the vmapped group run below covers every phase (the actor-critic's with imagination) on two.
    Any phase and device count can be passed."""
    mesh = parallel.make_mesh(num_devices)
    agent = Agent.from_config(debug_config, num_actions=4)
    optimizer = steps.optimizer_from_config(debug_config[name])
    replays = [synthetic_replay(debug_config, seed=s).device_replay() for s in (0, 1)]
    variables = [agent.init(jax.random.key(s)) for s in (0, 1)]
    keys = [jax.random.key(10 + s) for s in (0, 1)]
    start = phases.make_imagination_start(agent, debug_config, mesh)
    imagined = [start(v, r, jax.random.key(20 + i)) for i, (v, r) in enumerate(zip(variables, replays))]
    rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)

    def call(fn, state, imagined_, world_model, replay, key, first):
        if name == "actor_critic":
            return fn(state, imagined_, world_model, replay, key, first)
        return fn(state, replay, key, first)

    single = phases.make_phase(agent, debug_config, name, optimizer, mesh, 1, scan=False)
    want = []
    for s in range(2):
        state = parallel.place(steps.TrainState.create(jax.tree.map(jnp.copy, variables[s][name]), optimizer), rep)
        world_model = {k: variables[s][k] for k in ("denoiser", "rew_end_model")}
        out = call(single, state, jax.device_put(jax.tree.map(jnp.copy, imagined[s]), data), world_model,
                   replays[s], keys[s], jnp.int32(0))
        want.append(jax.device_get(out))
    grouped = phases.make_phase(agent, debug_config, name, optimizer, mesh, 1, scan=False, num_seeds=2)
    states = group.stack([steps.TrainState.create(variables[s][name], optimizer) for s in range(2)])
    world_models = group.stack([{k: variables[s][k] for k in ("denoiser", "rew_end_model")} for s in range(2)])
    got = call(grouped, parallel.place(states, rep),
               parallel.place(group.stack(imagined), parallel.seeds_data_sharded(mesh)), world_models,
               group.stack_replays(replays), jnp.stack(keys), jnp.int32(0))
    got = jax.device_get(got)
    for s in range(2):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[s], got), want[s], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Seeds 0 and 1 of the debug Catch config, each as a single run."""
    runs = {}
    for seed in (0, 1):
        workdir = str(tmp_path_factory.mktemp(f"single{seed}"))
        runs[seed] = (workdir, loop.Trainer(catch_config(seed=seed), workdir).run())
    return runs


def final_models(workdir, config):
    trainer = loop.Trainer(config, workdir)
    try:
        return jax.device_get(trainer.state), [trainer.replay.episode(i) for i in range(trainer.replay.num_episodes)]
    finally:
        trainer.close()


def assert_group_equals_singles(workdir, single_runs, results, exact: bool):
    for seed in (0, 1):
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        assert results[seed] == single_runs[seed][1]
        with open(os.path.join(seed_dir, "config.json")) as f:
            assert json.load(f)["seed"] == seed  # the seed's directory is a single run's
        for name in ("evaluations.jsonl", "results.json"):
            with open(os.path.join(seed_dir, name)) as a, open(os.path.join(single_runs[seed][0], name)) as b:
                assert a.read() == b.read(), name
        got, got_replay = final_models(seed_dir, catch_config(seed=seed))
        want, want_replay = final_models(single_runs[seed][0], catch_config(seed=seed))
        if exact:  # the seeds' own programs, one after another
            chex.assert_trees_all_equal(got, want)
        else:  # parameters up to the float32 rounding of the vmapped programs (see above); everything sampled
            # from them (actions, hence the replay and the returns) exactly
            chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
        for a, b in zip(got_replay, want_replay, strict=True):
            chex.assert_trees_all_equal(a, b)


def test_a_vmapped_group_computes_what_its_single_runs_compute(single_runs, tmp_path):
    """The GPU/TPU way (seed_loop vmap), here on the 2 fake CPU devices."""
    workdir = str(tmp_path)
    config = catch_config(seeds=(0, 1), **{"training.seed_loop": "vmap"})
    trainer = group.GroupTrainer(config, workdir)
    assert trainer.vmap and trainer.mesh.size == 2
    results = trainer.run()
    assert set(results) == {0, 1}
    assert_group_equals_singles(workdir, single_runs, results, exact=False)
    assert group.GroupTrainer(config, workdir).run() == results  # finished: nothing to do


StopsAfter = stopping_after(group.GroupTrainer)


def test_a_stopped_group_resumes_to_the_same_result(single_runs, tmp_path):
    """The CPU way (seed_loop auto: the seeds' own programs in turn), stopped in epoch 1 and resumed: bit for bit
    the single runs."""
    workdir = str(tmp_path)
    assert not group.use_vmap("auto", "cpu") and group.use_vmap("auto", "gpu")
    with pytest.raises(loop.Preempted, match="saved the 2 seeds"):
        StopsAfter(catch_config(seeds=(0, 1)), workdir, stop_after=9).run()  # inside epoch 1's denoiser phase
    for seed in (0, 1):  # stopped mid-run, each seed with a checkpoint
        assert os.listdir(os.path.join(workdir, f"seed_{seed}", "checkpoints"))
        assert not os.path.exists(os.path.join(workdir, f"seed_{seed}", "results.json"))
    results = group.GroupTrainer(catch_config(seeds=(0, 1)), workdir).run()
    assert_group_equals_singles(workdir, single_runs, results, exact=True)
