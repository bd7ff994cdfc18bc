"""Batches from the memory-mapped store, read by index; nothing is copied into RAM whole."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_STATS_CHUNK = 256


def normalisation_stats(
  features: np.ndarray, indices: np.ndarray, valid_frames: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Per-bin mean and std over the valid frames of `indices` (the training fold only).

  Returns:
    mean, std: [n_bins] float32; std is floored so silent bins do not divide by zero.
  """
  n_bins = features.shape[1]
  total = np.zeros(n_bins)
  total_sq = np.zeros(n_bins)
  count = 0
  for start in range(0, len(indices), _STATS_CHUNK):
    chunk = np.sort(indices[start : start + _STATS_CHUNK])
    x = np.asarray(features[chunk], dtype=np.float64)  # [chunk, n_bins, n_frames]
    frame_ids = np.arange(x.shape[-1])
    valid = frame_ids[None, :] < valid_frames[chunk][:, None]  # [chunk, n_frames]
    total += np.einsum("cbt,ct->b", x, valid)
    total_sq += np.einsum("cbt,ct->b", x * x, valid)
    count += int(valid.sum())
  mean = total / max(count, 1)
  std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def epoch_permutation(indices: np.ndarray, seed: int, fold: int, epoch: int) -> np.ndarray:
  """The training order of one epoch: a function of (seed, fold, epoch) only, so resumable."""
  return np.random.default_rng([seed, fold, epoch]).permutation(indices)


def standardise(features, mean, std):
  """Features [..., n_bins, n_frames] standardised per bin with a training fold's [n_bins]
  mean and std; numpy or jax arrays (training's batches and predict's windows)."""
  return (features - mean[..., :, None]) / std[..., :, None]


def padded_size(n: int, batch_size: int, multiple: int = 1) -> int:
  """The batch an evaluation of n (<= batch_size) examples is padded to: the next power of
  two, at least `multiple` (the devices) and a multiple of it, at most batch_size. Powers
  of two bound the number of compiled batch shapes."""
  size = max(1 << max(n - 1, 0).bit_length(), multiple)
  return min(batch_size, multiple * -(-size // multiple))


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """rows [n, ...] padded to [size, ...] by repeating the first row (its outputs are dropped)."""
  return np.concatenate([rows, np.repeat(rows[:1], size - len(rows), axis=0)])


def read_batch(
  store, indices: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> dict[str, np.ndarray]:
  """Standardised features [batch, n_bins, n_frames], labels and valid frames for `indices`."""
  order = np.argsort(indices)  # Sorted reads are sequential on disk.
  rows = np.empty((len(indices),) + store.features.shape[1:], dtype=np.float32)
  rows[order] = store.features[indices[order]]
  return {
    "features": standardise(rows, mean, std).astype(np.float32, copy=False),
    "labels": store.labels[indices].astype(np.int32),
    "valid_frames": store.valid_frames[indices].astype(np.int32),
  }


def train_batches(
  store,
  indices: np.ndarray,
  batch_size: int,
  mean: np.ndarray,
  std: np.ndarray,
  *,
  seed: int,
  fold: int,
  epoch: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global training batch; the last partial batch is dropped.

  Every process computes the same global permutation and reads only its contiguous slice.
  """
  _check_divides(batch_size, process_count)
  permutation = epoch_permutation(indices, seed, fold, epoch)
  local = batch_size // process_count
  for start in range(0, len(permutation) - batch_size + 1, batch_size):
    batch = permutation[start : start + batch_size]
    yield read_batch(store, batch[process_index * local : (process_index + 1) * local], mean, std)


def eval_batches(
  store,
  indices: np.ndarray,
  batch_size: int,
  mean: np.ndarray,
  std: np.ndarray,
  *,
  multiple: int = 1,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(this process's slice of a global batch, number of real examples in the global batch).

  Every example is evaluated exactly once: a last, smaller batch is padded (padded_size,
  pad_rows), and the caller keeps the first `n_real` outputs.
  """
  _check_divides(batch_size, process_count)
  for start in range(0, len(indices), batch_size):
    batch = indices[start : start + batch_size]
    padded = pad_rows(batch, padded_size(len(batch), batch_size, max(multiple, process_count)))
    local = len(padded) // process_count
    mine = padded[process_index * local : (process_index + 1) * local]
    yield read_batch(store, mine, mean, std), len(batch)


def _check_divides(batch_size: int, process_count: int) -> None:
  if batch_size % process_count:
    raise ValueError(
      f"batch size {batch_size} does not split evenly over {process_count} processes"
    )
