"""Orbax checkpoints per fold: the newest that can be read is the one resumed from."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

from ser_jax import checkpoints


def _state(value: float) -> dict:
  return {"w": jnp.full((64, 8), value), "step": jnp.asarray(int(value))}


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_resumed(tmp_path, caplog):
  directory = tmp_path / "fold_0" / "checkpoints"
  manager = checkpoints.checkpoint_manager(directory)
  for epoch in (5, 10):
    checkpoints.save(manager, epoch, _state(float(epoch)))
  manager.wait_until_finished()
  manager.close()
  for path in (directory / "10").rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

  manager = checkpoints.checkpoint_manager(directory)
  with caplog.at_level(logging.WARNING):
    epoch, restored = checkpoints.restore_latest(manager, _state(0.0))
  assert epoch == 5
  np.testing.assert_array_equal(restored["w"], np.full((64, 8), 5.0))
  assert "The checkpoint of epoch 10 cannot be read" in caplog.text
  (aside,) = (tmp_path / "fold_0" / "unreadable_checkpoints").iterdir()
  assert aside.name.startswith("10-") and not (directory / "10").exists()
  checkpoints.save(manager, 10, _state(10.0))  # Training on saves epoch 10 again.
  manager.wait_until_finished()
  assert checkpoints.restore_latest(manager, _state(0.0))[0] == 10
  manager.close()


def test_no_checkpoint_is_epoch_zero_and_the_state_given(tmp_path):
  manager = checkpoints.checkpoint_manager(tmp_path / "checkpoints")
  state = _state(3.0)
  assert checkpoints.restore_latest(manager, state) == (0, state)
  manager.close()
