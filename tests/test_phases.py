"""The compiled training phases: the same updates on one device and on two, and sampling inside the scan.

Calls run `debug_config.training.steps_per_call` updates, as the training loop's do, so that these tests and
the loop's share compiled programs through the persistent compilation cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diamond_jax.benchmarking.fixtures import synthetic_replay
from diamond_jax.data.replay import ReplayDataset
from diamond_jax.training import parallel, phases, steps


@pytest.fixture(scope="module")
def replay_host(debug_config):
    return synthetic_replay(debug_config, seed=0)


def new_state(variables, optimizer, mesh):
    """A train state placed on the mesh, on copies: the phases donate their state."""
    return jax.device_put(steps.TrainState.create(jax.tree.map(jnp.copy, variables), optimizer),
                          parallel.replicated(mesh))


def device_replay(replay: ReplayDataset, mesh):
    """The replay's device arrays, replicated on the mesh (a copy: the training phases do not donate it)."""
    return jax.device_put(jax.tree.map(jnp.copy, replay.device_replay()), parallel.replicated(mesh))


@pytest.mark.parametrize("name", ["denoiser", "rew_end_model"])
def test_world_model_phase_is_the_same_on_one_and_two_devices(debug_agent, debug_config, replay_host, name):
    agent, variables = debug_agent
    optimizer = steps.optimizer_from_config(debug_config[name])
    update = steps.make_update(getattr(agent, name).loss, optimizer)
    results = []
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        chunk = phases.make_model_phase(update, phases.batch_sampler(debug_config, name), mesh,
                                        debug_config.training.steps_per_call)
        state = new_state(variables[name], optimizer, mesh)
        state, metrics = chunk(state, device_replay(replay_host, mesh), jax.random.key(0), jnp.int32(5))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    assert results[0][1][phases_loss(name)].shape == (debug_config.training.steps_per_call,)


def phases_loss(name):
    return {"denoiser": "loss_denoising", "rew_end_model": "loss_total"}[name]


def test_actor_critic_phase_is_the_same_on_one_and_two_devices(debug_agent, debug_config, replay_host):
    agent, variables = debug_agent
    optimizer = steps.optimizer_from_config(debug_config.actor_critic)
    world_model = {k: variables[k] for k in ("denoiser", "rew_end_model")}
    results = []
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        replay = device_replay(replay_host, mesh)
        imagined = phases.make_imagination_start(agent, debug_config, mesh)(variables, replay, jax.random.key(1))
        chunk = phases.make_actor_critic_phase(agent, debug_config, optimizer, mesh,
                                               debug_config.training.steps_per_call)
        state = new_state(variables["actor_critic"], optimizer, mesh)
        state, imagined, metrics = chunk(state, imagined, jax.device_put(world_model, parallel.replicated(mesh)),
                                         replay, jax.random.key(2), jnp.int32(0))
        if n == 2:
            assert len(imagined.obs.sharding.device_set) == 2
        results.append(jax.device_get((state.params, imagined, metrics)))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_updates_draw_the_same_numbers_however_a_phase_is_cut(debug_agent, debug_config, replay_host):
    """Four updates in one call equal two calls of two: keys depend on the update's index only."""
    agent, variables = debug_agent
    optimizer = steps.optimizer_from_config(debug_config.denoiser)
    update = steps.make_update(agent.denoiser.loss, optimizer)
    mesh = parallel.make_mesh(1)
    sample = phases.batch_sampler(debug_config, "denoiser")
    replay = device_replay(replay_host, mesh)
    key = jax.random.key(3)

    def fresh():
        return new_state(variables["denoiser"], optimizer, mesh)

    assert debug_config.training.steps_per_call == 4
    one, _ = phases.make_model_phase(update, sample, mesh, 4)(fresh(), replay, key, jnp.int32(0))
    two = phases.make_model_phase(update, sample, mesh, 2)
    state, _ = two(fresh(), replay, key, jnp.int32(0))
    state, _ = two(state, replay, key, jnp.int32(2))
    chex.assert_trees_all_equal(jax.device_get(one.params), jax.device_get(state.params))


def test_first_non_finite():
    assert phases.first_non_finite(jnp.array([1.0, 2.0])) == (True, 0)
    assert phases.first_non_finite(jnp.array([1.0, jnp.inf, jnp.nan])) == (False, 1)


def test_one_update_per_call_computes_what_the_scan_computes(debug_agent, debug_config, replay_host):
    """The CPU's host loop over single-update calls against one lax.scan of the same updates: the same keys and
    batches, so the same parameters up to float reassociation inside XLA's fusions."""
    agent, variables = debug_agent
    optimizer = steps.optimizer_from_config(debug_config.denoiser)
    update = steps.make_update(agent.denoiser.loss, optimizer)
    mesh = parallel.make_mesh(1)
    sample = phases.batch_sampler(debug_config, "denoiser")
    replay = device_replay(replay_host, mesh)
    key = jax.random.key(4)
    scanned, scan_metrics = phases.make_model_phase(update, sample, mesh, 4)(
        new_state(variables["denoiser"], optimizer, mesh), replay, key, jnp.int32(0))
    single = phases.make_model_phase(update, sample, mesh, 1, scan=False)
    state, losses = new_state(variables["denoiser"], optimizer, mesh), []
    for i in range(4):
        state, metrics = single(state, replay, key, jnp.int32(i))
        assert metrics["loss_denoising"].shape == (1,)
        losses.append(float(metrics["loss_denoising"][0]))
    assert int(state.step) == 4
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(scanned.params), atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(losses, list(jax.device_get(scan_metrics["loss_denoising"])), rtol=1e-5)
    with pytest.raises(ValueError, match="one update per call"):
        phases.make_model_phase(update, sample, mesh, 2, scan=False)(state, replay, key, jnp.int32(0))


def test_phase_loop_choice():
    assert phases.use_scan("auto", "gpu") and phases.use_scan("auto", "tpu") and not phases.use_scan("auto", "cpu")
    assert phases.use_scan("scan", "cpu") and not phases.use_scan("python", "gpu")



def test_the_denoiser_sampler_follows_include_final_frame(debug_config):
    """One 6-step episode whose frame k is filled with 10 k: the position of a segment's last frame is read off
    its pixels. The denoiser's segments end on the final frame (6, counted real) only when the config asks;
    the reward/end model's segments do not depend on the field."""
    size = debug_config.env.size
    length = 6
    replay_host = ReplayDataset(1, (size, size, 3))
    frames = np.repeat(np.arange(0, 10 * (length + 1), 10, dtype=np.uint8), size * size * 3).reshape(
        length + 1, size, size, 3)
    end = np.zeros(length, bool)
    end[-1] = True
    replay_host.append(0, frames[:-1], np.zeros(length, np.int32), np.zeros(length, np.float32), end,
                       np.zeros(length, bool), frames[-1])
    replay = replay_host.device_replay()
    config = debug_config.copy_and_resolve_references()
    config.denoiser.training.batch_size = config.rew_end_model.training.batch_size = 256
    batches = {}
    for include in (False, True):
        config.denoiser.training.include_final_frame = include
        for name in ("denoiser", "rew_end_model"):
            batches[include, name] = jax.device_get(
                jax.jit(phases.batch_sampler(config, name))(replay, jax.random.key(5)))
    for include in (False, True):
        batch = batches[include, "denoiser"]
        last = np.rint((batch.obs[:, -1, 0, 0, 0] + 1) / 2 * 255 / 10).astype(int)  # frame position
        assert last.max() == (length if include else length - 1)
        assert batch.mask_padding[:, -1].all()  # the target is always counted: a real step, or the final frame
    chex.assert_trees_all_equal(batches[False, "rew_end_model"], batches[True, "rew_end_model"])
