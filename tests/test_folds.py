"""Cross-validation folds: stratified as in the paper, or speaker-independent.

The checks are properties any correct folds have, over random corpora with imbalanced
classes (IEMOCAP's 48/12/27/13 % among them); the stratified folds are also scikit-learn's
StratifiedKFold's, which the paper's protocol names.
"""

from __future__ import annotations

import numpy as np
import pytest

from ser_jax.folds import FoldError, make_folds, stratified_test_folds

CLASS_NAMES = ("neutral", "happiness", "sadness", "anger")
IEMOCAP_SHARES = (0.48, 0.12, 0.27, 0.13)
CORPUS_SEEDS = range(12)


def _labels(seed: int = 0, n: int = 203) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.choice(len(CLASS_NAMES), n, p=[0.45, 0.15, 0.25, 0.15])


def _random_labels(seed: int) -> tuple[np.ndarray, int]:
  """(labels, n_folds): 40-500 examples, IEMOCAP's or random class shares, 2-10 folds."""
  rng = np.random.default_rng(seed)
  n_folds = int(rng.choice([2, 3, 5, 10]))
  n = int(rng.integers(40, 500))
  shares = IEMOCAP_SHARES if seed % 2 == 0 else rng.dirichlet(np.ones(len(CLASS_NAMES)))
  counts = np.maximum(rng.multinomial(n, shares), n_folds)  # Every class fills every fold.
  return rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts)), n_folds


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
  """Test sets are disjoint and cover every index once; train is the complement of test."""
  tested = np.concatenate([test for _, test in folds])
  np.testing.assert_array_equal(np.sort(tested), np.arange(n))
  for train, test in folds:
    assert len(test) > 0
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(n))
    assert len(train) + len(test) == n  # No index twice within train or test.
    np.testing.assert_array_equal(train, np.sort(train))
    np.testing.assert_array_equal(test, np.sort(test))


def _test_sets(folds) -> list[tuple[int, ...]]:
  return [tuple(test) for _, test in folds]


def _assert_same_folds(first, again) -> None:
  assert len(first) == len(again)
  for (a_train, a_test), (b_train, b_test) in zip(first, again, strict=True):
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)


# --- stratified ------------------------------------------------------------------------


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_stratified_folds_partition_the_examples(corpus_seed):
  labels, n_folds = _random_labels(corpus_seed)
  folds = _stratified(labels, n_folds, seed=corpus_seed)
  assert len(folds) == n_folds
  _assert_partition(folds, len(labels))


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_stratified_folds_keep_each_class_share_within_one_example(corpus_seed):
  """Each fold's test (and so train) set has every class's overall share, +-1 example."""
  labels, n_folds = _random_labels(corpus_seed)
  totals = np.bincount(labels, minlength=len(CLASS_NAMES))
  for train, test in _stratified(labels, n_folds, seed=corpus_seed + 100):
    test_counts = np.bincount(labels[test], minlength=len(CLASS_NAMES))
    train_counts = np.bincount(labels[train], minlength=len(CLASS_NAMES))
    assert np.all(np.abs(test_counts - totals / n_folds) <= 1), (test_counts, totals / n_folds)
    want_train = totals * (n_folds - 1) / n_folds
    assert np.all(np.abs(train_counts - want_train) <= 1), (train_counts, want_train)


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_stratified_folds_are_deterministic_in_the_seed(corpus_seed):
  labels, n_folds = _random_labels(corpus_seed)
  first = _stratified(labels, n_folds, seed=5)
  _assert_same_folds(first, _stratified(labels, n_folds, seed=5))
  # Another seed shuffles differently: not the same partition, not even reordered.
  assert sorted(_test_sets(_stratified(labels, n_folds, seed=6))) != sorted(_test_sets(first))


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_stratified_folds_are_scikit_learns(corpus_seed):
  """The same folds as StratifiedKFold(shuffle=True, random_state=seed); also for class
  numbers with gaps, first appearing in any order."""
  from sklearn.model_selection import StratifiedKFold

  labels, n_folds = _random_labels(corpus_seed)
  seed = 1000 + corpus_seed

  def sklearn_folds(labels):
    splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(labels, labels)
    return [(np.sort(train), np.sort(test)) for train, test in splits]

  _assert_same_folds(_stratified(labels, n_folds, seed=seed), sklearn_folds(labels))
  sparse = np.array([7, 0, 5, 3])[labels]
  test_fold = stratified_test_folds(sparse, n_folds, seed)
  got = [(np.flatnonzero(test_fold != k), np.flatnonzero(test_fold == k)) for k in range(n_folds)]
  _assert_same_folds(got, sklearn_folds(sparse))


def test_stratified_folds_mix_the_corpus_order():
  """Shuffled, not cut in blocks: a fold's examples of a class are not consecutive ones."""
  labels = _labels(3)
  for _, test in _stratified(labels, 5, seed=0):
    for c in range(len(CLASS_NAMES)):
      of_class = np.flatnonzero(labels == c)  # The class's examples in corpus order.
      assert np.any(np.diff(np.flatnonzero(np.isin(of_class, test))) > 1), CLASS_NAMES[c]


def test_stratified_error_names_the_class_with_too_few_examples():
  labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 3)
  with pytest.raises(FoldError, match=r"class 'anger' has examples \(3\)"):
    _stratified(labels, n_folds=5)
  assert len(_stratified(labels, n_folds=3)) == 3  # As many examples as folds is enough.


def test_stratified_error_for_a_class_with_no_examples():
  labels = np.array([0] * 10 + [1] * 10 + [3] * 10)  # No 'sadness' at all.
  with pytest.raises(FoldError, match=r"class 'sadness' has 0 usable example\(s\); .* drop it"):
    _stratified(labels, n_folds=5)


def test_a_class_of_one_example_is_told_to_go_not_to_lower_the_folds_below_two():
  labels = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3])
  with pytest.raises(FoldError, match=r"class 'anger' has 1 usable example\(s\)") as error:
    _stratified(labels, n_folds=2)
  assert "cv.n_folds <=" not in str(error.value)


# --- speaker-independent ---------------------------------------------------------------


def _speaker_corpus(n_speakers: int, speakers_per_group: int, seed: int = 0, per_speaker: int = 20):
  rng = np.random.default_rng(seed)
  speakers = np.repeat([f"spk{s:02d}" for s in range(n_speakers)], per_speaker)
  groups = np.repeat(
    [f"Session{s // speakers_per_group + 1}" for s in range(n_speakers)], per_speaker
  )
  labels = rng.integers(0, len(CLASS_NAMES), len(speakers))
  return labels, speakers, groups


def _random_speaker_corpus(seed: int):
  """(labels, speakers, groups, n_folds): 5-14 speakers of 3-40 clips in sessions of 1-3."""
  rng = np.random.default_rng(seed)
  n_speakers = int(rng.integers(5, 15))
  per_speaker = rng.integers(3, 41, n_speakers)
  speakers_per_group = int(rng.integers(1, 4))
  order = rng.permutation(n_speakers)  # Speakers' clips interleaved, not in blocks.
  speakers = np.repeat([f"spk{s:02d}" for s in order], per_speaker)
  groups = np.repeat([f"Session{s // speakers_per_group + 1}" for s in order], per_speaker)
  index = rng.permutation(len(speakers))
  labels = rng.choice(len(CLASS_NAMES), len(speakers), p=IEMOCAP_SHARES)
  n_folds = int(rng.integers(2, min(n_speakers, 6) + 1))
  return labels, speakers[index], groups[index], n_folds


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


def _assert_speaker_independent(folds, speakers) -> None:
  for train, test in folds:
    assert not set(speakers[train]) & set(speakers[test])


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_random_corpora_give_speaker_independent_partitions(corpus_seed):
  labels, speakers, groups, n_folds = _random_speaker_corpus(corpus_seed)
  folds = _speaker_folds(labels, speakers, groups, n_folds, seed=corpus_seed)
  assert len(folds) == n_folds
  _assert_partition(folds, len(labels))
  _assert_speaker_independent(folds, speakers)


@pytest.mark.parametrize(
  ("n_speakers", "speakers_per_group", "n_folds"),
  [(10, 2, 5), (8, 1, 5), (12, 4, 3), (7, 1, 7), (9, 3, 2)],
)
def test_no_speaker_is_in_both_train_and_test(n_speakers, speakers_per_group, n_folds):
  labels, speakers, groups = _speaker_corpus(n_speakers, speakers_per_group)
  folds = _speaker_folds(labels, speakers, groups, n_folds)
  assert len(folds) == n_folds
  _assert_partition(folds, len(labels))
  _assert_speaker_independent(folds, speakers)


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


@pytest.mark.parametrize("corpus_seed", CORPUS_SEEDS)
def test_speaker_folds_are_deterministic_in_the_seed(corpus_seed):
  labels, speakers, groups, n_folds = _random_speaker_corpus(corpus_seed)
  _assert_same_folds(
    _speaker_folds(labels, speakers, groups, n_folds, seed=1),
    _speaker_folds(labels, speakers, groups, n_folds, seed=1),
  )


def test_another_seed_spreads_speakers_differently():
  """Nine speakers with the same label mix, so which speakers share a fold is the seed's."""
  labels = np.tile(np.repeat(np.arange(len(CLASS_NAMES)), [10, 2, 6, 3]), 9)
  speakers = np.repeat([f"spk{s}" for s in range(9)], 21)
  first = _speaker_folds(labels, speakers, speakers, n_folds=3, seed=1)
  other = _speaker_folds(labels, speakers, speakers, n_folds=3, seed=2)
  _assert_speaker_independent(other, speakers)
  assert sorted(_test_sets(other)) != sorted(_test_sets(first))


@pytest.mark.parametrize(("n_speakers", "speakers_per_group"), [(3, 1), (4, 2), (4, 4)])
def test_speaker_error_when_fewer_speakers_than_folds(n_speakers, speakers_per_group):
  labels, speakers, groups = _speaker_corpus(n_speakers, speakers_per_group)
  with pytest.raises(FoldError, match=rf"needs at least cv.n_folds=5 speakers.*has {n_speakers}"):
    _speaker_folds(labels, speakers, groups, n_folds=5)


def test_unknown_scheme_is_an_error():
  labels = _labels()
  with pytest.raises(FoldError, match="unknown cv.scheme 'random'"):
    make_folds(labels, labels, labels, scheme="random", n_folds=5, seed=0)
