"""Cross-validation folds: stratified as in the paper, or speaker-independent."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from ser_jax.folds import FoldError, make_folds

CLASS_NAMES = ("neutral", "happiness", "sadness", "anger")


def _labels(seed: int = 0, n: int = 203) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.choice(len(CLASS_NAMES), n, p=[0.45, 0.15, 0.25, 0.15])


def _stratified(labels, n_folds=5, seed=0):
  n = len(labels)
  return make_folds(
    labels,
    np.zeros(n, dtype=int),
    np.zeros(n, dtype=int),
    scheme="stratified",
    n_folds=n_folds,
    seed=seed,
    class_names=CLASS_NAMES,
  )


def _assert_partition(folds, n: int) -> None:
  """Train and test are disjoint, cover everything, and every index is tested once."""
  tested = np.concatenate([test for _, test in folds])
  np.testing.assert_array_equal(np.sort(tested), np.arange(n))
  for train, test in folds:
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(n))
    np.testing.assert_array_equal(train, np.sort(train))
    np.testing.assert_array_equal(test, np.sort(test))


# --- stratified ------------------------------------------------------------------------


@pytest.mark.parametrize("n_folds", [2, 5, 10])
@pytest.mark.parametrize("seed", [0, 7])
def test_stratified_folds_partition_the_examples(n_folds, seed):
  labels = _labels(seed)
  folds = _stratified(labels, n_folds, seed)
  assert len(folds) == n_folds
  _assert_partition(folds, len(labels))


@pytest.mark.parametrize("n_folds", [2, 5, 10])
def test_stratified_test_folds_keep_class_proportions_within_one(n_folds):
  labels = _labels(1)
  totals = np.bincount(labels, minlength=len(CLASS_NAMES))
  for _, test in _stratified(labels, n_folds, seed=3):
    counts = np.bincount(labels[test], minlength=len(CLASS_NAMES))
    assert np.all(np.abs(counts - totals / n_folds) <= 1), (counts, totals / n_folds)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stratified_folds_equal_sklearn_stratified_kfold(seed):
  labels = _labels(seed)
  splitter = StratifiedKFold(5, shuffle=True, random_state=seed)
  want = list(splitter.split(np.zeros(len(labels)), labels))
  got = _stratified(labels, 5, seed)
  assert len(got) == len(want)
  for (train, test), (want_train, want_test) in zip(got, want, strict=True):
    np.testing.assert_array_equal(train, np.sort(want_train))
    np.testing.assert_array_equal(test, np.sort(want_test))


def test_stratified_folds_are_deterministic_in_the_seed():
  labels = _labels(2)
  first, again, other = (
    _stratified(labels, seed=5),
    _stratified(labels, seed=5),
    _stratified(labels, seed=6),
  )
  for (a_train, a_test), (b_train, b_test) in zip(first, again, strict=True):
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)
  assert any(
    not np.array_equal(a_test, c_test)
    for (_, a_test), (_, c_test) in zip(first, other, strict=True)
  )


def test_stratified_error_names_the_class_with_too_few_examples():
  labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 3)
  with pytest.raises(FoldError, match=r"class 'anger' has examples \(3\)"):
    _stratified(labels, n_folds=5)
  assert len(_stratified(labels, n_folds=3)) == 3  # As many examples as folds is enough.


def test_stratified_error_for_a_class_with_no_examples():
  labels = np.array([0] * 10 + [1] * 10 + [3] * 10)  # No 'sadness' at all.
  with pytest.raises(FoldError, match="'sadness'"):
    _stratified(labels, n_folds=5)


# --- speaker-independent ---------------------------------------------------------------


def _speaker_corpus(n_speakers: int, speakers_per_group: int, seed: int = 0, per_speaker: int = 20):
  rng = np.random.default_rng(seed)
  speakers = np.repeat([f"spk{s:02d}" for s in range(n_speakers)], per_speaker)
  groups = np.repeat(
    [f"Session{s // speakers_per_group + 1}" for s in range(n_speakers)], per_speaker
  )
  labels = rng.integers(0, len(CLASS_NAMES), len(speakers))
  return labels, speakers, groups


def _speaker_folds(labels, speakers, groups, n_folds=5, seed=0):
  return make_folds(
    labels,
    speakers,
    groups,
    scheme="speaker",
    n_folds=n_folds,
    seed=seed,
    class_names=CLASS_NAMES,
  )


@pytest.mark.parametrize(
  ("n_speakers", "speakers_per_group", "n_folds"),
  [(10, 2, 5), (8, 1, 5), (12, 4, 3), (7, 1, 7), (9, 3, 2)],
)
def test_no_speaker_is_in_both_train_and_test(n_speakers, speakers_per_group, n_folds):
  labels, speakers, groups = _speaker_corpus(n_speakers, speakers_per_group)
  folds = _speaker_folds(labels, speakers, groups, n_folds)
  assert len(folds) == n_folds
  _assert_partition(folds, len(labels))
  for train, test in folds:
    assert not set(speakers[train]) & set(speakers[test])


def test_five_groups_and_five_folds_is_leave_one_group_out():
  """IEMOCAP: ten speakers in five sessions; each fold holds out one whole session."""
  labels, speakers, groups = _speaker_corpus(10, 2, seed=3)
  folds = _speaker_folds(labels, speakers, groups, n_folds=5)
  held_out = []
  for train, test in folds:
    (group,) = set(groups[test])
    held_out.append(group)
    np.testing.assert_array_equal(test, np.flatnonzero(groups == group))
    np.testing.assert_array_equal(train, np.flatnonzero(groups != group))
  assert sorted(held_out) == [f"Session{i}" for i in range(1, 6)]


def test_speaker_folds_are_deterministic_in_the_seed():
  labels, speakers, groups = _speaker_corpus(9, 1, seed=4)
  first = _speaker_folds(labels, speakers, groups, seed=1)
  again = _speaker_folds(labels, speakers, groups, seed=1)
  for (a_train, a_test), (b_train, b_test) in zip(first, again, strict=True):
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)


@pytest.mark.parametrize(("n_speakers", "speakers_per_group"), [(3, 1), (4, 2), (4, 4)])
def test_speaker_error_when_fewer_speakers_than_folds(n_speakers, speakers_per_group):
  labels, speakers, groups = _speaker_corpus(n_speakers, speakers_per_group)
  with pytest.raises(FoldError, match=rf"needs at least cv.n_folds=5 speakers.*has {n_speakers}"):
    _speaker_folds(labels, speakers, groups, n_folds=5)


def test_unknown_scheme_is_an_error():
  labels = _labels()
  with pytest.raises(FoldError, match="unknown cv.scheme 'random'"):
    make_folds(labels, labels, labels, scheme="random", n_folds=5, seed=0)
