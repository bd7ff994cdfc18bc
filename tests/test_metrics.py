"""WA, UA, macro F1 and confusion matrices agree with scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from ser_jax import metrics

N_CLASSES = 4
CLASSES = list(range(N_CLASSES))


def _random_pair(seed: int, n: int = 200, skew: bool = False):
  rng = np.random.default_rng(seed)
  p = [0.5, 0.1, 0.25, 0.15] if skew else None
  labels = rng.choice(N_CLASSES, n, p=p)
  # Mostly right, sometimes a random class: a realistic, imperfect classifier.
  predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, N_CLASSES, n))
  return labels, predictions


CASES = [(seed, skew) for seed in range(4) for skew in (False, True)]


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_confusion_counts_equal_sklearn_confusion_matrix(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  np.testing.assert_array_equal(counts, skm.confusion_matrix(labels, predictions, labels=CLASSES))
  assert counts.sum() == len(labels)


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_wa_equals_accuracy_score_percent(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  assert metrics.wa(counts) == pytest.approx(
    100 * skm.accuracy_score(labels, predictions), abs=1e-9
  )


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_wa_is_micro_f1_with_one_label_per_utterance(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  assert metrics.wa(counts) == pytest.approx(
    100 * skm.f1_score(labels, predictions, average="micro"), abs=1e-9
  )


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_ua_equals_balanced_accuracy_percent(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  assert metrics.ua(counts) == pytest.approx(
    100 * skm.balanced_accuracy_score(labels, predictions), abs=1e-9
  )


def test_ua_averages_over_classes_present_in_the_labels():
  labels = np.array([0, 0, 1, 1, 1, 2])  # Class 3 never occurs but is predicted once.
  predictions = np.array([0, 1, 1, 1, 3, 2])
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = 100 * skm.balanced_accuracy_score(labels, predictions)
  assert metrics.ua(counts) == pytest.approx(want, abs=1e-9)
  assert metrics.ua(counts) == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_macro_f1_equals_f1_score_macro_percent(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  assert metrics.macro_f1(counts) == pytest.approx(
    100 * skm.f1_score(labels, predictions, average="macro"), abs=1e-9
  )


def test_macro_f1_counts_a_never_predicted_class_as_zero():
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  predictions = np.array([0, 0, 1, 0, 2, 1, 2, 0])  # Class 3 is never predicted.
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  want = 100 * skm.f1_score(labels, predictions, average="macro", zero_division=0)
  assert metrics.macro_f1(counts) == pytest.approx(want, abs=1e-9)


def test_macro_f1_leaves_out_a_class_absent_everywhere():
  """A class in neither labels nor predictions is left out, as f1_score without `labels`
  (EmoBox's call) leaves it; over all `n_classes` it would count as 0."""
  labels = np.array([0, 0, 1, 1, 2, 2])
  predictions = np.array([0, 1, 1, 1, 2, 0])
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  want = 100 * skm.f1_score(labels, predictions, average="macro")
  assert metrics.macro_f1(counts) == pytest.approx(want, abs=1e-9)
  over_all = skm.f1_score(labels, predictions, labels=CLASSES, average="macro", zero_division=0)
  assert metrics.macro_f1(counts) > 100 * over_all


@pytest.mark.parametrize(("seed", "skew"), CASES)
def test_row_normalised_equals_confusion_matrix_normalised_by_true_class(seed, skew):
  labels, predictions = _random_pair(seed, skew=skew)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  rows = metrics.row_normalised(counts)
  want = 100 * skm.confusion_matrix(labels, predictions, labels=CLASSES, normalize="true")
  np.testing.assert_allclose(rows, want, rtol=0, atol=1e-9)
  np.testing.assert_allclose(rows.sum(axis=1), 100.0)


def test_row_normalised_leaves_an_absent_class_row_at_zero():
  labels = np.array([0, 1, 1, 2])
  predictions = np.array([0, 1, 2, 2])
  rows = metrics.row_normalised(metrics.confusion_counts(labels, predictions, N_CLASSES))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = 100 * skm.confusion_matrix(labels, predictions, labels=CLASSES, normalize="true")
  np.testing.assert_allclose(rows, want, atol=1e-9)
  np.testing.assert_array_equal(rows[3], 0.0)


def test_per_class_recall_equals_recall_score_per_class():
  labels, predictions = _random_pair(11, skew=True)
  counts = metrics.confusion_counts(labels, predictions, N_CLASSES)
  want = 100 * skm.recall_score(labels, predictions, labels=CLASSES, average=None)
  np.testing.assert_allclose(metrics.per_class_recall(counts), want, atol=1e-9)


def test_perfect_predictions_score_100_everywhere():
  labels = np.array([0, 1, 2, 3, 3, 2])
  counts = metrics.confusion_counts(labels, labels, N_CLASSES)
  assert metrics.wa(counts) == pytest.approx(100.0)
  assert metrics.ua(counts) == pytest.approx(100.0)
  assert metrics.macro_f1(counts) == pytest.approx(100.0)
  np.testing.assert_array_equal(metrics.row_normalised(counts), 100 * np.eye(N_CLASSES))
