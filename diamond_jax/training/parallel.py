"""Data parallelism: a one-axis device mesh over the devices of every process of the run; batches are split
along it, everything else is replicated. With several processes (jax.distributed), each runs the whole run."""

import os
from typing import Any, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def use_cpu_devices(count: Optional[int]) -> None:
    """Splits the host CPU into `count` JAX devices (None: JAX's own setting); call before JAX first lists
    its devices."""
    if count is not None:
        if count < 1:
            raise ValueError(f"--cpu_devices={count}: must be at least 1.")
        jax.config.update("jax_num_cpu_devices", count)


def initialize_distributed() -> bool:
    """Joins a run of several processes, one mesh over all their devices, when the environment describes one;
    returns whether it did. Call before JAX first lists its devices.

    A SLURM allocation of several tasks: JAX reads the coordinator, process count and rank from SLURM itself.
    Elsewhere: JAX_COORDINATOR_ADDRESS (host:port of process 0, the same on every process), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (0 .. JAX_NUM_PROCESSES - 1); JAX reads only the address, so the other two are read here.
    CPU processes exchange gradients through gloo, JAX's default cross-process collectives on CPU.
    """
    on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if "JAX_COORDINATOR_ADDRESS" not in os.environ:
        if on_slurm:
            jax.distributed.initialize()
        return on_slurm
    given = {}
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        value = os.environ.get(name)
        if value is None and not on_slurm:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {name} is not. Fix: set JAX_NUM_PROCESSES (the number of "
                "processes) and JAX_PROCESS_ID (this one's, from 0) in every process, or unset "
                "JAX_COORDINATOR_ADDRESS for a run of one process.")
        if value is not None and not value.isdigit():
            raise ValueError(f"{name}={value!r}: must be a whole number.")
        given[name] = None if value is None else int(value)
    jax.distributed.initialize(num_processes=given["JAX_NUM_PROCESSES"], process_id=given["JAX_PROCESS_ID"])
    return True


def make_mesh(num_devices: int = 0, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over the first `num_devices` devices (0 = all devices of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} {devices[0].platform} device(s) are visible. "
            f"Fix: set --config.num_devices to at most {len(devices)}, or 0 for all of them."
        )
    if num_devices not in (0, len(devices)) and jax.process_count() > 1:
        # Every process runs every program of the run, so each must hold a part of the mesh.
        raise ValueError(
            f"num_devices={num_devices} in a run of {jax.process_count()} processes: a mesh of some of their "
            f"{len(devices)} devices leaves processes out. Fix: set --config.num_devices to 0 (all devices), or "
            "limit each process's devices instead (CUDA_VISIBLE_DEVICES, --cpu_devices).")
    return Mesh(np.array(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def seeds_data_sharded(mesh: Mesh) -> NamedSharding:
    """A seed group's per-seed batches [seeds, batch, ...]: every device holds every seed, and each seed's batch
    axis is split over the mesh as a single run's is (training/group.py)."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def place(tree: Any, sharding: Any) -> Any:
    """jax.device_put onto the mesh, in a run of one process or several (every process passing the same values).

    With several processes, host copies are placed: JAX 0.10 places an array of this process's device (anything
    computed before placing) onto a replicated sharding as an array whose shards cannot be read (orbax fails
    to save it)."""
    if jax.process_count() > 1:
        tree = jax.device_get(tree)
    return jax.device_put(tree, sharding)


def any_process(flags: Sequence[bool]) -> Tuple[bool, ...]:
    """Each flag, true when it is true in any process of the run. Decisions that lead to collectives (a save, a
    stop) must be the same in every process, or one waits in a collective that the others never join."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    gathered = multihost_utils.process_allgather(np.array(flags, bool))  # [processes, flags]
    return tuple(bool(f) for f in np.asarray(gathered).any(axis=0))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"config.{field}={batch_size} cannot be split over {mesh.size} devices. Fix: use a multiple of "
            f"{mesh.size}, or set --config.num_devices to a divisor of {batch_size}."
        )
