"""jax.distributed on this machine: two local CPU processes of one device each form one mesh (gradients
all-reduced through gloo), and one update of each model equals the update of one process on two devices."""

import os
import pickle
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from diamond_jax import imagination
from diamond_jax.agent import Agent
from diamond_jax.benchmarking.fixtures import synthetic_replay
from diamond_jax.imagination import ActorCriticInputs
from diamond_jax.training import parallel, phases
from tests import multihost_update as worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
TIMEOUT_S = 300  # a process that waits for a peer that never comes fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batches(config, variables):
    """Batches of the training loop's samplers from a synthetic replay, on the host."""
    replay = synthetic_replay(config, seed=0).device_replay()
    keys = jax.random.split(jax.random.key(7), 4)
    batches = {name: jax.jit(phases.batch_sampler(config, name))(replay, key)
               for name, key in zip(("denoiser", "rew_end_model"), keys)}
    b, k = config.actor_critic.training.batch_size, config.world_model_env.initial_conditions_per_row
    agent = Agent.from_config(config, worker.NUM_ACTIONS)
    start = jax.jit(lambda v, c: imagination.initial_state(imagination.burn_in(agent, v, c)))
    state = start(variables, phases.initial_conditions_sampler(config, b)(replay, keys[2]))
    pool = jax.tree.map(lambda x: x.reshape((b, k) + x.shape[1:]),
                        phases.initial_conditions_sampler(config, b * k)(replay, keys[3]))
    world_model = {name: variables[name] for name in ("denoiser", "rew_end_model")}
    batches["actor_critic"] = ActorCriticInputs(state, pool, world_model)
    return jax.device_get(batches)


def rows_of(tree, process: int):
    """Process `process`'s share of rows: the mesh orders devices by process, so its block of rows."""
    return jax.tree.map(lambda x: np.split(x, NUM_PROCESSES)[process], tree)


def process_rows(batches, process: int):
    """What process `process` holds of the global batches: its rows; the world model whole."""
    ac = batches["actor_critic"]
    return {"denoiser": rows_of(batches["denoiser"], process),
            "rew_end_model": rows_of(batches["rew_end_model"], process),
            "actor_critic": ActorCriticInputs(rows_of(ac.state, process), rows_of(ac.pool, process), ac.world_model)}


def run_processes(tmp_path, variables, batches):
    """The layout and results of each of NUM_PROCESSES worker processes, each given only its rows."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES=str(NUM_PROCESSES), PYTHONPATH=REPO)
    # One device per process, as the worker asks (no fake devices); the compiler flags stay those of this
    # process (tests/conftest.py), whose results the workers' must equal bit for bit.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    procs = []
    for p in range(NUM_PROCESSES):
        with open(tmp_path / f"inputs_{p}.pkl", "wb") as f:
            pickle.dump((variables, process_rows(batches, p)), f)
        log = open(tmp_path / f"log_{p}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_update", str(tmp_path / f"inputs_{p}.pkl"),
             str(tmp_path / f"outputs_{p}.pkl")], cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(p)), stdout=log,
            stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join(f"--- process {p}:\n{(tmp_path / f'log_{p}.txt').read_text()[-3000:]}"
                     for p in range(NUM_PROCESSES))
    assert codes is not None, f"the processes did not finish in {TIMEOUT_S} s\n{logs}"
    assert codes == [0] * NUM_PROCESSES, f"exit statuses {codes}\n{logs}"
    outputs = []
    for p in range(NUM_PROCESSES):
        with open(tmp_path / f"outputs_{p}.pkl", "rb") as f:
            outputs.append(pickle.load(f))
    return outputs


def test_two_processes_update_each_model_as_one_process_on_two_devices(tmp_path):
    config = worker.update_config()
    agent = Agent.from_config(config, worker.NUM_ACTIONS)
    variables = jax.device_get(agent.init(jax.random.key(0)))
    batches = global_batches(config, variables)
    for name in worker.MODEL_NAMES:
        assert config[name].training.batch_size % NUM_PROCESSES == 0

    mesh = parallel.make_mesh(2)  # this process: tests/conftest.py's two CPU devices
    placed = jax.tree.map(lambda s, b: jax.device_put(b, s), worker.batch_shardings(mesh), batches,
                          is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    expected = worker.update_each_model(config, variables, placed, mesh)

    outputs = run_processes(tmp_path, variables, batches)
    for p, (layout, results) in enumerate(outputs):
        error = layout.pop("one_device_mesh_error")
        # any_process: a flag raised in process 1 alone is raised in both.
        assert layout == {"process_index": p, "process_count": NUM_PROCESSES, "mesh_processes": [0, 1],
                          "any_process": (True, False)}
        assert error is not None and "Fix: set --config.num_devices to 0" in error, error
        for name in worker.MODEL_NAMES:
            state, metrics = results[name]
            assert int(state.step) == 1
            # Bit for bit (measured), not merely close: each device computes its rows alone, the same program
            # in both set-ups, and an all-reduce over two devices adds two numbers, in whichever order. With
            # more than two processes the order of the sum could differ and a tolerance would be needed.
            chex.assert_trees_all_equal((state.params, state.opt_state, metrics),
                                        (expected[name][0].params, expected[name][0].opt_state, expected[name][1]))
            # A real step, not a no-op: Adam's first step moves a parameter by about lr (its gradient over the
            # gradient's magnitude), so the largest move is lr.
            moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(state.params),
                                                           jax.tree.leaves(variables[name]["params"])))
            assert np.isclose(moved, config[name].optimizer.lr, rtol=0.01), (name, moved)
        # Each process holds its own rows of the next imagined state: the half its rows of the inputs became.
        chex.assert_trees_all_equal(results["imagined"], rows_of(expected["imagined"], p))


def test_a_coordinator_without_process_count_or_rank_is_bad_input(tmp_path):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_PROCESS_ID="0")
    env.pop("JAX_NUM_PROCESSES", None)
    env.pop("SLURM_NTASKS", None)
    result = subprocess.run([sys.executable, "-m", "diamond_jax.main", "--config=configs/atari100k.py:debug",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not. Fix: set" in result.stderr
    assert not (tmp_path / "run").exists()


def test_process_count_and_rank_must_be_whole_numbers(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first': must be a whole number"):
        parallel.initialize_distributed()


def test_without_a_cluster_nothing_is_initialised(monkeypatch):
    for name in ("SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert not parallel.initialize_distributed()
    assert jax.process_count() == 1
