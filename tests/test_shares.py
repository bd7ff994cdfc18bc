"""Class shares: the largest subset with the asked shares, drawn from a seed, spread over speakers."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from ser_jax.config import ConfigError
from ser_jax.data.shares import SharesError, class_counts, subset_to_shares, target_counts

# IEMOCAP improvised (neutral, happiness, sadness, anger), and its shares to 3 decimals.
IEMOCAP_COUNTS = (1099, 284, 608, 289)
IEMOCAP_SHARES = (0.482, 0.125, 0.267, 0.127)


def _corpus(counts, n_speakers: int = 10, seed: int = 0):
  """Labels with these class counts, shuffled, and speakers of uneven sizes."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  sizes = rng.uniform(0.5, 2.0, n_speakers)
  speakers = rng.choice(
    [f"spk{s:02d}" for s in range(n_speakers)], len(labels), p=sizes / sizes.sum()
  )
  return labels, speakers


def _within_one_of_shares(kept, shares) -> bool:
  """Each class count within one utterance of its share of the kept total, in exact decimals."""
  weights = [Fraction(str(w)) for w in shares]
  total = sum(kept)
  return all(abs(n - total * w / sum(weights)) < 1 for n, w in zip(kept, weights, strict=True))


def _largest_by_brute_force(counts, shares) -> int:
  """The largest total over every count vector that fits the corpus and meets the shares."""
  return max(
    sum(kept)
    for kept in itertools.product(*(range(c + 1) for c in counts))
    if _within_one_of_shares(kept, shares)
  )


@pytest.mark.parametrize(
  ("counts", "shares"),
  [
    ((5, 9, 4), (1, 1, 1)),
    ((3, 12), (0.3, 0.7)),
    ((7, 2, 9), (0.5, 0.2, 0.3)),
    ((10, 10, 10), (3, 1, 2)),
    ((4, 11, 6), (0.25, 0.5, 0.25)),
    ((1, 8, 8), (1, 4, 4)),
  ],
)
def test_target_counts_are_the_largest_that_meet_the_shares(counts, shares):
  kept = target_counts(counts, shares)
  assert np.all(kept <= counts)
  assert _within_one_of_shares(kept.tolist(), shares)
  assert kept.sum() == _largest_by_brute_force(counts, shares)


def test_one_more_utterance_of_any_class_breaks_the_shares():
  labels, speakers = _corpus((300, 120, 200, 90))
  shares = (0.4, 0.2, 0.25, 0.15)
  kept = class_counts(labels[subset_to_shares(labels, speakers, shares, seed=0)], 4)
  assert _within_one_of_shares(kept.tolist(), shares)
  for c in np.flatnonzero(kept < (300, 120, 200, 90)):
    more = kept.copy()
    more[c] += 1
    assert not _within_one_of_shares(more.tolist(), shares)


def test_subset_counts_match_the_targets_within_one_of_the_shares():
  labels, speakers = _corpus((300, 120, 200, 90))
  shares = (0.4, 0.2, 0.25, 0.15)
  kept = subset_to_shares(labels, speakers, shares, seed=3)
  after = class_counts(labels[kept], 4)
  np.testing.assert_array_equal(after, target_counts((300, 120, 200, 90), shares))
  np.testing.assert_allclose(after, np.array(shares) / sum(shares) * len(kept), atol=1)


def test_iemocap_counts_as_shares_keep_every_utterance():
  labels, speakers = _corpus(IEMOCAP_COUNTS)
  kept = subset_to_shares(labels, speakers, IEMOCAP_COUNTS, seed=0)
  np.testing.assert_array_equal(kept, np.arange(len(labels)))


def test_iemocap_rounded_shares_keep_the_counts_within_one():
  labels, speakers = _corpus(IEMOCAP_COUNTS)
  kept = subset_to_shares(labels, speakers, IEMOCAP_SHARES, seed=0)
  after = class_counts(labels[kept], 4)
  assert np.all(np.abs(after - IEMOCAP_COUNTS) <= 1), after


def test_balanced_corpus_at_equal_shares_keeps_everything():
  labels, speakers = _corpus((50, 50, 50, 50))
  kept = subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=0)
  np.testing.assert_array_equal(kept, np.arange(200))


def test_weights_are_normalised_to_shares():
  labels, speakers = _corpus((300, 120, 200, 90))
  for scale in (0.01, 1.0, 7.0):
    kept = subset_to_shares(labels, speakers, (4 * scale, 2 * scale, 2.5 * scale, 1.5 * scale), 5)
    np.testing.assert_array_equal(kept, subset_to_shares(labels, speakers, (40, 20, 25, 15), 5))


def test_kept_indices_are_sorted_distinct_and_in_range():
  labels, speakers = _corpus((300, 120, 200, 90))
  kept = subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=0)
  assert kept.dtype.kind == "i"
  assert np.all(np.diff(kept) > 0)
  assert kept[0] >= 0 and kept[-1] < len(labels)


def test_same_seed_same_subset_other_seed_other_subset():
  labels, speakers = _corpus((300, 120, 200, 90))
  first = subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=0)
  np.testing.assert_array_equal(first, subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=0))
  other = subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=1)
  assert not np.array_equal(first, other)
  # The class counts depend on the counts and shares alone, not on the seed.
  np.testing.assert_array_equal(class_counts(labels[first], 4), class_counts(labels[other], 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_what_is_dropped_is_spread_over_speakers_in_proportion(seed):
  labels, speakers = _corpus((300, 120, 200, 90), n_speakers=8, seed=seed)
  kept = subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=seed)
  after = class_counts(labels[kept], 4)
  before = class_counts(labels, 4)
  for speaker in np.unique(speakers):
    had = class_counts(labels[speakers == speaker], 4)
    has = class_counts(labels[kept][speakers[kept] == speaker], 4)
    proportional = after * had / before
    assert np.all(np.abs(has - proportional) < 1), (speaker, has, proportional)
    assert np.all(has[had > 0] > 0), speaker


@pytest.mark.parametrize("seed", range(5))
def test_a_speaker_keeps_a_class_when_enough_is_left_over(seed):
  """Class 0 keeps 11 of 20: proportions 0.55, 0.55, 1.65, 8.25 round to 1, 1, 1, 8, not 0."""
  labels = np.array([0] * 20 + [1] * 10)
  speakers = np.array(["a", "b"] + ["c"] * 3 + ["d"] * 15 + ["d"] * 10)
  kept = subset_to_shares(labels, speakers, (1, 1), seed=seed)
  np.testing.assert_array_equal(class_counts(labels[kept], 2), [11, 10])
  in_class = kept[labels[kept] == 0]
  kept_per_speaker = [int(np.sum(speakers[in_class] == s)) for s in "abcd"]
  assert kept_per_speaker == [1, 1, 1, 8]


def test_class_counts_count_every_class_even_when_absent():
  np.testing.assert_array_equal(class_counts(np.array([0, 2, 2, 0, 2]), 4), [2, 0, 3, 0])


def test_label_beyond_the_classes_is_an_error():
  with pytest.raises(ValueError, match=r"labels range over 0\.\.4 but there are 4 classes"):
    class_counts(np.array([0, 4]), 4)


def test_wrong_number_of_weights_is_an_error_naming_the_classes():
  labels, speakers = _corpus((30, 30, 30, 30))
  names = ("neutral", "happiness", "sadness", "anger")
  with pytest.raises(
    SharesError, match=r"data\.class_shares has 3 weights but there are 4 classes \(neutral, "
  ):
    subset_to_shares(labels, speakers, (1, 1, 1), seed=0, class_names=names)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf")])
def test_non_positive_weight_is_an_error_naming_the_class(bad):
  labels, speakers = _corpus((30, 30, 30, 30))
  names = ("neutral", "happiness", "sadness", "anger")
  with pytest.raises(SharesError, match=r"for class 'sadness'; every weight must be a number > 0"):
    subset_to_shares(labels, speakers, (1, 1, bad, 1), seed=0, class_names=names)


def test_class_without_utterances_is_an_error_naming_it():
  labels, speakers = _corpus((30, 30, 0, 30))
  names = ("neutral", "happiness", "sadness", "anger")
  with pytest.raises(SharesError, match=r"class 'sadness' has no utterances") as error:
    subset_to_shares(labels, speakers, (1, 1, 1, 1), seed=0, class_names=names)
  assert "\n" not in str(error.value)


def test_shares_errors_are_config_errors():
  """The entry points print ConfigErrors in one line, without a traceback."""
  assert issubclass(SharesError, ConfigError)
  assert issubclass(SharesError, ValueError)
