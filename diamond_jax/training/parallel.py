"""Data parallelism: a one-axis device mesh; batches are split along it, everything else is replicated."""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def use_cpu_devices(count: Optional[int]) -> None:
    """Splits the host CPU into `count` JAX devices (None: JAX's own setting); call before JAX first lists
    its devices."""
    if count is not None:
        if count < 1:
            raise ValueError(f"--cpu_devices={count}: must be at least 1.")
        jax.config.update("jax_num_cpu_devices", count)


def make_mesh(num_devices: int = 0, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over the first `num_devices` devices (0 = all devices of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} {devices[0].platform} device(s) are visible. "
            f"Fix: set --config.num_devices to at most {len(devices)}, or 0 for all of them."
        )
    return Mesh(np.array(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"config.{field}={batch_size} cannot be split over {mesh.size} devices. Fix: use a multiple of "
            f"{mesh.size}, or set --config.num_devices to a divisor of {batch_size}."
        )
