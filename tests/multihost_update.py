"""One update of each model on a mesh of every process's devices, for tests/test_multihost.py.

The test runs `update_each_model` in its own process on two devices, and starts this file twice as one run of two
processes of one device each:

    JAX_COORDINATOR_ADDRESS=127.0.0.1:<port> JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<p> \\
        python -m tests.multihost_update <inputs of process p> <outputs of process p>

Each process reads the models' variables and its own half of every batch (rows p * b/2 .. (p + 1) * b/2 - 1; the
mesh orders devices by process), and writes what it computed.
"""

import pickle
import sys
from typing import Any, Dict

import chex
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from configs import atari100k
from diamond_jax import imagination
from diamond_jax.agent import Agent
from diamond_jax.imagination import ActorCriticInputs
from diamond_jax.training import parallel, steps

MODEL_NAMES = ("denoiser", "rew_end_model", "actor_critic")
NUM_ACTIONS = 4


def update_config():
    """The debug config without learning-rate warm-up, whose first update has learning rate 0 and would leave
    the parameters as they were."""
    config = atari100k.get_config("debug")
    with config.unlocked():
        for name in MODEL_NAMES:
            config[name].training.lr_warmup_steps = 0
    return config


def batch_shardings(mesh) -> Dict[str, Any]:
    """As the training phases place them: rows split over the mesh, the actor-critic's world model replicated."""
    rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    return {"denoiser": data, "rew_end_model": data,
            "actor_critic": ActorCriticInputs(state=data, pool=data, world_model=rep)}


def update_each_model(config, variables, batches: Dict[str, Any], mesh) -> Dict[str, Any]:
    """{model: (train state, metrics)} on the host after one update from `variables` on `batches` (placed
    with batch_shardings(mesh)), keys jax.random.key(0), key(1), key(2); and "imagined": this process's rows of
    the imagined environments' state after the actor-critic's update."""
    agent = Agent.from_config(config, NUM_ACTIONS)
    horizon = config.world_model_env.horizon
    results = {}
    for i, name in enumerate(MODEL_NAMES):
        optimizer = steps.optimizer_from_config(config[name])
        if name == "actor_critic":
            loss = imagination.make_actor_critic_loss(agent, horizon)
            update = steps.jit_update(steps.make_update(loss, optimizer, has_output=True), mesh,
                                      batch_sharding=batch_shardings(mesh)[name], has_output=True)
        else:
            update = steps.jit_update(steps.make_update(getattr(agent, name).loss, optimizer), mesh)
        # A copy: the update donates its state.
        state = steps.TrainState.create(jax.tree.map(jnp.array, variables[name]), optimizer)
        placed = parallel.place(state, parallel.replicated(mesh))
        # Placed as the training loop places it; orbax saves it by its addressable shards, which must read back.
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x.addressable_shards[0].data, placed), state)
        out = update(placed, batches[name], jax.random.key(i))
        results[name] = jax.device_get(out[:2])
        if name == "actor_critic":
            results["imagined"] = jax.device_get(multihost_utils.global_array_to_host_local_array(
                out[2], mesh, parallel.data_sharded(mesh).spec))
    return results


def place_process_rows(rows: Dict[str, Any], shardings: Dict[str, Any]) -> Dict[str, Any]:
    """This process's rows of the global batches as global arrays: each process gives only its own rows; a
    replicated leaf (the same on every process) is given whole."""

    def place(sharding, tree):
        count = 1 if sharding.is_fully_replicated else jax.process_count()
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count,) + x.shape[1:]), tree)

    return jax.tree.map(place, shardings, rows, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def main(inputs_path: str, outputs_path: str) -> None:
    parallel.use_cpu_devices(1)
    if not parallel.initialize_distributed():
        raise SystemExit("set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    mesh = parallel.make_mesh()
    try:
        parallel.make_mesh(1)
        one_device_mesh_error = None
    except ValueError as error:
        one_device_mesh_error = str(error)
    with open(inputs_path, "rb") as f:
        variables, rows = pickle.load(f)
    batches = place_process_rows(rows, batch_shardings(mesh))
    results = update_each_model(update_config(), variables, batches, mesh)
    layout = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "any_process": parallel.any_process([jax.process_index() == 1, False]),
              "mesh_processes": [d.process_index for d in mesh.devices.flat],
              "one_device_mesh_error": one_device_mesh_error}
    with open(outputs_path, "wb") as f:
        pickle.dump((layout, results), f)


if __name__ == "__main__":
    main(*sys.argv[1:])
