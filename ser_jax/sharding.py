"""Data parallelism with `jax.jit` and shardings: one code path for 1 device or a pod."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ser_jax.config import ConfigError

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Topology:
  """The mesh over all devices and the shardings the experiment uses."""

  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, devices=None) -> Topology:
    """The mesh over `devices` (default: every device of the default backend)."""
    devices = jax.devices() if devices is None else devices
    # Auto axes: XLA propagates the batch sharding through every op, including the
    # reshapes that vmap over members introduces; Explicit axes would reject those.
    mesh = jax.make_mesh(
      (len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices
    )
    return cls(mesh)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def stacked_batch(self) -> NamedSharding:
    """Batches stacked on a leading axis [n, batch, ...], each split over the devices."""
    return NamedSharding(self.mesh, P(None, DATA_AXIS))

  def check_batch_size(self, key: str, batch_size: int) -> None:
    """The global batch must split evenly over devices and processes."""
    if batch_size % self.num_devices:
      raise ConfigError(
        f"{key}={batch_size} does not divide among {self.num_devices} devices; use a multiple "
        f"of {self.num_devices} (e.g. {self.num_devices * max(1, batch_size // self.num_devices)})"
      )

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's slice into arrays sharded over the data axis."""
    return {
      name: jax.make_array_from_process_local_data(self.batch, value)
      for name, value in local_batch.items()
    }

  def global_stacked_batches(self, local: np.ndarray) -> jax.Array:
    """[n, local batch, ...] slices of each process assembled into [n, batch, ...] arrays."""
    return jax.make_array_from_process_local_data(self.stacked_batch, local)

  def fsdp(self, tree):
    """Shardings that split each array's largest divisible axis over the data axis.

    The ZeRO/FSDP option: parameters and optimiser moments are stored in pieces and
    gathered by XLA where a step needs them.
    """

    def spec(x):
      shape = getattr(x, "shape", ())
      for axis in np.argsort(shape)[::-1]:
        if shape[axis] % self.num_devices == 0 and shape[axis] >= self.num_devices:
          parts = [None] * len(shape)
          parts[axis] = DATA_AXIS
          return NamedSharding(self.mesh, P(*parts))
      return self.replicated

    return jax.tree.map(spec, tree)
