"""Classification metrics from confusion counts [true][predicted]: WA, UA, macro F1, recalls.

Each function takes counts as an array or nested sequences and gives percent, as
scikit-learn computes it from the same predictions. Micro F1 is not here: with one label per
utterance every error is one false positive and one false negative, so it equals WA.
"""

from __future__ import annotations

import numpy as np


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
  """[n_classes, n_classes] counts; rows are true classes, columns predictions."""
  counts = np.zeros((n_classes, n_classes), dtype=np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def wa(counts) -> float:
  """Weighted accuracy (WA): correct / total (scikit-learn's accuracy_score)."""
  counts = np.asarray(counts)
  return float(100.0 * np.trace(counts) / max(counts.sum(), 1))


def per_class_recall(counts) -> np.ndarray:
  """Recall of each class; classes absent from the labels count as 0."""
  counts = np.asarray(counts)
  support = counts.sum(axis=1)
  return 100.0 * np.diag(counts) / np.maximum(support, 1)


def ua(counts) -> float:
  """Unweighted accuracy (UA): the mean recall over the classes present in the labels
  (scikit-learn's balanced_accuracy_score)."""
  counts = np.asarray(counts)
  present = counts.sum(axis=1) > 0
  return float(per_class_recall(counts)[present].mean())


def macro_f1(counts) -> float:
  """Mean F1 over the classes in the labels or the predictions: scikit-learn's
  f1_score(average='macro') without `labels`, as EmoBox's EmoEval calls it. A class absent
  from both is left out; one never predicted (or never true) counts as 0."""
  counts = np.asarray(counts)
  true_positive = np.diag(counts).astype(float)
  predicted = counts.sum(axis=0)
  actual = counts.sum(axis=1)
  present = (predicted + actual) > 0
  f1 = 2 * true_positive[present] / (predicted + actual)[present]
  return 100.0 * float(f1.mean()) if present.any() else 0.0


def row_normalised(counts) -> np.ndarray:
  """Rows as percentages of each true class, as in the paper's Tables 2 and 3."""
  counts = np.asarray(counts)
  return 100.0 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
