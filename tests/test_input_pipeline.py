"""Normalisation statistics and batch order of the input pipeline."""

from __future__ import annotations

import types

import numpy as np
import pytest

from ser_jax import evaluation, input_pipeline

N_BINS, N_FRAMES = 3, 7


def _store(n: int, seed: int = 0) -> types.SimpleNamespace:
  """A store stand-in whose frame 0 of bin 0 holds the example's own index."""
  rng = np.random.default_rng(seed)
  features = rng.normal(2.0, 3.0, (n, N_BINS, N_FRAMES)).astype(np.float32)
  features[:, 1] *= 10.0  # Bins on different scales.
  features[:, 0, 0] = np.arange(n)
  return types.SimpleNamespace(
    features=features,
    labels=rng.integers(0, 4, n).astype(np.int64),
    valid_frames=rng.integers(1, N_FRAMES + 1, n).astype(np.int64),
  )


def _indices_of(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Recovers example indices from the marker (mean 0, std 1 leave features unchanged)."""
  return batch["features"][:, 0, 0].astype(np.int64)


IDENTITY = (np.zeros(N_BINS, np.float32), np.ones(N_BINS, np.float32))


# --- normalisation_stats ---------------------------------------------------------------


@pytest.mark.parametrize("n_chosen", [1, 5, 300, 599])
def test_normalisation_stats_use_valid_frames_of_chosen_examples_only(n_chosen):
  store = _store(600)
  rng = np.random.default_rng(1)
  indices = rng.choice(600, n_chosen, replace=False)  # Unsorted; spans several chunks.
  mean, std = input_pipeline.normalisation_stats(store.features, indices, store.valid_frames)

  frames = np.concatenate(
    [store.features[i, :, : store.valid_frames[i]].astype(np.float64) for i in indices], axis=1
  )  # [n_bins, total valid frames]
  assert mean.dtype == std.dtype == np.float32
  assert mean.shape == std.shape == (N_BINS,)
  np.testing.assert_allclose(mean, frames.mean(axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std, np.maximum(frames.std(axis=1), 1e-3), rtol=1e-4, atol=1e-5)


def test_normalisation_stats_ignore_padding_and_other_examples():
  store = _store(40)
  indices = np.arange(0, 40, 2)
  before = input_pipeline.normalisation_stats(store.features, indices, store.valid_frames)
  changed = store.features.copy()
  changed[1::2] = 1e6  # Examples outside the fold.
  for i in indices:
    changed[i, :, store.valid_frames[i] :] = -1e6  # Padding frames.
  after = input_pipeline.normalisation_stats(changed, indices, store.valid_frames)
  np.testing.assert_array_equal(before[0], after[0])
  np.testing.assert_array_equal(before[1], after[1])


def test_normalisation_std_is_floored_for_constant_bins():
  store = _store(10)
  store.features[:, 2, :] = 5.0
  mean, std = input_pipeline.normalisation_stats(store.features, np.arange(10), store.valid_frames)
  assert mean[2] == pytest.approx(5.0)
  assert std[2] == pytest.approx(1e-3)


def test_read_batch_standardises_with_the_given_statistics():
  store = _store(20)
  mean = np.array([1.0, -2.0, 0.5], np.float32)
  std = np.array([2.0, 4.0, 0.25], np.float32)
  indices = np.array([7, 3, 19, 3])
  batch = input_pipeline.read_batch(store, indices, mean, std)
  want = (store.features[indices] - mean[None, :, None]) / std[None, :, None]
  np.testing.assert_allclose(batch["features"], want, rtol=1e-6)
  np.testing.assert_array_equal(batch["labels"], store.labels[indices])
  np.testing.assert_array_equal(batch["valid_frames"], store.valid_frames[indices])
  assert batch["labels"].dtype == batch["valid_frames"].dtype == np.int32
  assert batch["features"].dtype == np.float32


# --- train_batches ---------------------------------------------------------------------


def _train_order(store, indices, batch_size, *, seed, fold, epoch, process_count=1):
  """Global batches as index arrays, concatenating every process's slice."""
  per_process = [
    [
      _indices_of(b)
      for b in input_pipeline.train_batches(
        store,
        indices,
        batch_size,
        *IDENTITY,
        seed=seed,
        fold=fold,
        epoch=epoch,
        process_index=p,
        process_count=process_count,
      )
    ]
    for p in range(process_count)
  ]
  return [np.concatenate(parts) for parts in zip(*per_process, strict=True)]


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_train_batches_cover_the_permutation_minus_the_remainder(batch_size):
  store = _store(50)
  indices = np.arange(3, 50, 2)  # 24 examples of a fold.
  batches = _train_order(store, indices, batch_size, seed=0, fold=1, epoch=2)
  assert len(batches) == len(indices) // batch_size
  assert all(len(b) == batch_size for b in batches)
  order = np.concatenate(batches)
  permutation = np.random.default_rng([0, 1, 2]).permutation(indices)
  np.testing.assert_array_equal(order, permutation[: len(order)])
  assert len(np.unique(order)) == len(order)
  assert set(order) <= set(indices)


def test_train_batches_drop_only_the_last_partial_batch():
  store = _store(30)
  indices = np.arange(27)
  order = np.concatenate(_train_order(store, indices, 8, seed=3, fold=0, epoch=0))
  assert len(order) == 24
  dropped = set(indices) - set(order)
  assert len(dropped) == 3


def test_train_batches_are_a_function_of_seed_fold_and_epoch_only():
  store = _store(40)
  indices = np.arange(40)
  np.random.seed(123)
  first = _train_order(store, indices, 5, seed=1, fold=2, epoch=3)
  np.random.seed(456)  # Global numpy state must not matter.
  _ = np.random.random(10)
  again = _train_order(store, indices, 5, seed=1, fold=2, epoch=3)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  reference = np.concatenate(first)
  for seed, fold, epoch in ((1, 2, 4), (1, 3, 3), (2, 2, 3)):
    other = np.concatenate(_train_order(store, indices, 5, seed=seed, fold=fold, epoch=epoch))
    assert not np.array_equal(other, reference), (seed, fold, epoch)
    np.testing.assert_array_equal(np.sort(other), np.sort(reference))


def test_train_batches_differ_across_epochs():
  store = _store(64)
  indices = np.arange(64)
  orders = [
    np.concatenate(_train_order(store, indices, 8, seed=0, fold=0, epoch=e)) for e in range(4)
  ]
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.array_equal(orders[i], orders[j])


@pytest.mark.parametrize(("batch_size", "process_count"), [(4, 2), (8, 2), (6, 3), (8, 4)])
def test_train_process_slices_concatenate_to_the_global_batch(batch_size, process_count):
  store = _store(50)
  indices = np.arange(50)
  single = _train_order(store, indices, batch_size, seed=4, fold=0, epoch=1)
  split = _train_order(
    store, indices, batch_size, seed=4, fold=0, epoch=1, process_count=process_count
  )
  assert len(single) == len(split)
  for a, b in zip(single, split, strict=True):
    np.testing.assert_array_equal(a, b)


# --- eval_batches ----------------------------------------------------------------------


def _eval(store, indices, batch_size, process_count):
  """(global batch indices, n_real) pairs, concatenating every process's slice."""
  per_process = [
    list(
      input_pipeline.eval_batches(
        store, indices, batch_size, *IDENTITY, process_index=p, process_count=process_count
      )
    )
    for p in range(process_count)
  ]
  out = []
  for parts in zip(*per_process, strict=True):
    n_real = {n for _, n in parts}
    assert len(n_real) == 1  # Every process agrees on the number of real examples.
    out.append((np.concatenate([_indices_of(b) for b, _ in parts]), n_real.pop()))
  return out


# The caller rounds the global eval batch up to a multiple of the device count, so with two
# processes the global batch is even.
@pytest.mark.parametrize(
  ("batch_size", "process_count"), [(1, 1), (3, 1), (8, 1), (2, 2), (4, 2), (8, 2)]
)
@pytest.mark.parametrize("n", [1, 7, 16, 23])
def test_eval_batches_count_every_index_exactly_once(batch_size, process_count, n):
  store = _store(40)
  indices = np.random.default_rng(n).choice(40, n, replace=False)
  batches = _eval(store, indices, batch_size, process_count)
  assert len(batches) == -(-n // batch_size)
  real = []
  for global_batch, n_real in batches:
    # Full batches, and a last one padded to a power of two (at most the batch size) that
    # splits over the processes.
    assert 1 <= n_real <= len(global_batch) <= batch_size
    assert len(global_batch) % process_count == 0
    assert len(global_batch) == batch_size or len(global_batch) < 2 * max(n_real, process_count)
    real.append(global_batch[:n_real])
    # The padding repeats an example of the same batch, so it is a valid input.
    np.testing.assert_array_equal(global_batch[n_real:], global_batch[0])
  np.testing.assert_array_equal(np.concatenate(real), indices)  # In order, each once.
  assert sum(n for _, n in batches) == n


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_local_slices_have_equal_size(process_count):
  store = _store(20)
  for p in range(process_count):
    for batch, _ in input_pipeline.eval_batches(
      store, np.arange(13), 4, *IDENTITY, process_index=p, process_count=process_count
    ):
      # 13 = 4 + 4 + 4 + 1: the last batch is padded to the processes' count.
      local = batch["labels"].shape[0]
      assert local in (4 // process_count, 1)
      assert batch["features"].shape == (local, N_BINS, N_FRAMES)


@pytest.mark.parametrize(
  ("n", "batch_size", "multiple", "expected"),
  [
    (1, 64, 1, 1),
    (3, 64, 1, 4),
    (5, 64, 1, 8),
    (33, 64, 1, 64),
    (64, 64, 1, 64),
    (3, 6, 1, 4),
    (5, 6, 1, 6),
    (1, 64, 8, 8),
    (9, 64, 8, 16),
    (3, 48, 8, 8),
    (33, 48, 8, 48),
  ],
)
def test_padded_size_is_the_next_power_of_two_within_the_batch(n, batch_size, multiple, expected):
  assert input_pipeline.padded_size(n, batch_size, multiple) == expected


def test_standardise_is_per_bin_for_numpy_and_jax():
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  features = rng.normal(3.0, 2.0, (5, N_BINS, N_FRAMES)).astype(np.float32)
  mean, std = features.mean(axis=(0, 2)), features.std(axis=(0, 2))
  for out in (
    input_pipeline.standardise(features, mean, std),
    np.asarray(
      input_pipeline.standardise(jnp.asarray(features), jnp.asarray(mean), jnp.asarray(std))
    ),
  ):
    np.testing.assert_allclose(out.mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_held_out_batches_give_every_fold_one_shape_and_each_utterance_once(process_count):
  """A fold's test utterances as [n_batches, batch] (the run's one evaluation shape), the
  padding the first utterance again, each process's share a slice of every global batch."""
  store = _store(40)
  indices = np.random.default_rng(1).choice(40, 13, replace=False)
  shares = [
    evaluation.held_out_batches(
      store, indices, 3, 8, *IDENTITY, process_index=p, process_count=process_count
    )
    for p in range(process_count)
  ]
  assert {share.shape for share in shares} == {(3, 8 // process_count, N_BINS, N_FRAMES)}
  global_batches = np.concatenate(shares, axis=1)  # [3, 8, bins, frames]
  order = global_batches[:, :, 0, 0].astype(np.int64).ravel()
  np.testing.assert_array_equal(order[:13], indices)
  np.testing.assert_array_equal(order[13:], indices[0])
