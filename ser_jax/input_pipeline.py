"""Batches by index: read from the store on disk (streaming), or gathered on the device
from the run's features put there once (`load_rows`, `device_batch`)."""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")

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
  mean and std; numpy or jax arrays (training's batches and predict's windows).

  Multiplies by 1 / std: XLA turns a division by a broadcast into that, so numpy and the
  device give the same bits.
  """
  return (features - mean[..., :, None]) * (1 / std)[..., :, None]


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


def batch_indices(indices: np.ndarray, batch_size: int, *, seed: int, fold: int, epoch: int):
  """[steps, batch_size] store indices of an epoch's global batches, in training order; the
  last partial batch is dropped."""
  permutation = epoch_permutation(indices, seed, fold, epoch)
  steps = len(permutation) // batch_size
  return permutation[: steps * batch_size].reshape(steps, batch_size)


def load_rows(store) -> dict[str, np.ndarray]:
  """The whole store in memory, for the device: features [N, n_bins, n_frames] float32,
  labels and valid_frames [N] int32."""
  return {
    "features": np.asarray(store.features[:], np.float32),
    "labels": store.labels.astype(np.int32),
    "valid_frames": store.valid_frames.astype(np.int32),
  }


def device_batch(rows: dict, indices, mean, std) -> dict:
  """The standardised batch of `indices` gathered from `rows` (`load_rows`, as device
  arrays); traced inside the device's epoch loop. The same values as `read_batch`."""
  return {
    "features": standardise(rows["features"][indices], mean, std),
    "labels": rows["labels"][indices],
    "valid_frames": rows["valid_frames"][indices],
  }


def prefetch(items: Iterator[T], size: int = 2) -> Iterator[T]:
  """`items` in order, with up to `size` of them prepared ahead in a thread, so that
  reading the next batch overlaps the step that runs on the current one."""
  sentinel = object()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = collections.deque(pool.submit(next, items, sentinel) for _ in range(size))
    while (item := ahead.popleft().result()) is not sentinel:
      ahead.append(pool.submit(next, items, sentinel))
      yield item


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
  local = batch_size // process_count
  for batch in batch_indices(indices, batch_size, seed=seed, fold=fold, epoch=epoch):
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
