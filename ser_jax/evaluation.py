"""Evaluation of trained models on a fold's test utterances: every one counted once."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from ser_jax import input_pipeline
from ser_jax.sharding import Topology


def held_out_batches(
  store,
  indices: np.ndarray,
  n_batches: int,
  batch_size: int,
  mean: np.ndarray,
  std: np.ndarray,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """This process's share [n_batches, batch_size / processes, n_bins, n_frames] of the
  standardised test features, padded to n_batches full batches by repeating the first
  utterance (whose extra outputs are dropped): one shape for every fold of a run."""
  padded = input_pipeline.pad_rows(indices, n_batches * batch_size).reshape(n_batches, batch_size)
  local = batch_size // process_count
  mine = padded[:, process_index * local : (process_index + 1) * local].ravel()
  features = input_pipeline.read_batch(store, mine, mean, std)["features"]
  return features.reshape(n_batches, local, *features.shape[1:])


def evaluate(
  program, state, store, indices: np.ndarray, mean, std, shapes, topology: Topology
) -> np.ndarray:
  """[members, len(indices), n_classes] probabilities of a cell's members.

  program: the compiled `Programs.evaluate` for `shapes` (its eval batches and size).
  """
  local = held_out_batches(
    store,
    indices,
    shapes.eval_batches,
    shapes.eval_batch_size,
    mean,
    std,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  probabilities = program(state, topology.global_stacked_batches(local))  # [m, n, batch, C]
  gathered = np.asarray(multihost_utils.process_allgather(probabilities, tiled=True))
  members, n, batch, n_classes = gathered.shape
  return gathered.reshape(members, n * batch, n_classes)[:, : len(indices)]
