"""Orbax checkpoints, one manager per fold; a checkpoint's step number is the epoch."""

from __future__ import annotations

import logging
import os
import pathlib

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
  """Keeps the two newest checkpoints; Orbax commits each one atomically (tmp dir, rename)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state) -> None:
  manager.save(epoch, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, state):
  """(epoch, state) from the newest checkpoint that can be read, or (0, state) when none.

  `state` gives the structure, shapes, dtypes and shardings to restore into. A checkpoint
  that cannot be read (damaged from outside: Orbax commits atomically) is moved aside to
  `unreadable_checkpoints/` beside the folder, with a logged line, and the one before it
  is tried; with several processes, that is an error for a person to look at instead.
  """
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  for epoch in sorted(manager.all_steps(), reverse=True):
    try:
      return epoch, manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # Orbax raises many types for damaged files.
      folder = pathlib.Path(str(manager.directory)) / str(epoch)
      reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
      if jax.process_count() > 1:
        raise UnreadableCheckpointError(
          f"the checkpoint {folder} cannot be read ({reason}); move it away to resume from "
          "the one before it"
        ) from error
      aside = folder.parent.parent / "unreadable_checkpoints" / f"{epoch}-{os.getpid()}"
      aside.parent.mkdir(exist_ok=True)
      os.replace(folder, aside)
      manager.reload()
      logging.warning(
        "The checkpoint of epoch %d cannot be read (%s); moved to %s, trying the one before",
        epoch,
        reason,
        aside,
      )
  return 0, state


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint that Orbax cannot restore, where it is not moved aside."""


class NoCheckpointError(FileNotFoundError):
  """A folder that holds no checkpoint."""


def restore_variables(directory: str | os.PathLike) -> dict:
  """{'params', 'batch_stats'} of the newest checkpoint in `directory` (leading member axis).

  Restores only these two parts, so the optimiser's structure (and its moments) never
  matter: what inference needs, for predict and tests.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise NoCheckpointError(f"no checkpoints in {directory}")
  manager = ocp.CheckpointManager(
    directory.absolute(),
    item_handlers=ocp.PyTreeCheckpointHandler(),
    options=ocp.CheckpointManagerOptions(create=False),
  )
  try:
    epoch = manager.latest_step()
    if epoch is None:
      raise NoCheckpointError(f"no checkpoints in {directory}")
    saved = manager.item_metadata(epoch).tree
    abstract = {
      part: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[part])
      for part in ("params", "batch_stats")
    }
    return manager.restore(
      epoch,
      args=ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      ),
    )
  finally:
    manager.close()
