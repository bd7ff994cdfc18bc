"""Orbax checkpoints, one manager per fold; a checkpoint's step number is the epoch."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """Keeps the two newest checkpoints; Orbax commits each one atomically (tmp dir, rename)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state) -> None:
  manager.save(epoch, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, state):
  """(epoch, state) from the newest checkpoint, or (0, state) when there is none.

  `state` gives the structure, shapes, dtypes and shardings to restore into.
  """
  epoch = manager.latest_step()
  if epoch is None:
    return 0, state
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  return epoch, manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
