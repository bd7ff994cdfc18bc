"""Classification metrics from confusion counts: WA, UA, macro F1, row-normalised matrices."""

from __future__ import annotations

import numpy as np


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
  """[n_classes, n_classes] counts; rows are true classes, columns predictions."""
  counts = np.zeros((n_classes, n_classes), dtype=np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def overall_accuracy(counts: np.ndarray) -> float:
  """Weighted accuracy (WA), percent: correct / total."""
  return 100.0 * np.trace(counts) / max(counts.sum(), 1)


def per_class_recall(counts: np.ndarray) -> np.ndarray:
  """Recall of each class, percent; classes absent from the labels count as 0."""
  support = counts.sum(axis=1)
  return 100.0 * np.diag(counts) / np.maximum(support, 1)


def class_accuracy(counts: np.ndarray) -> float:
  """Unweighted accuracy (UA), percent: the mean of per-class recalls over present classes."""
  present = counts.sum(axis=1) > 0
  return float(per_class_recall(counts)[present].mean())


def macro_f1(counts: np.ndarray) -> float:
  """Mean F1 over classes, percent (scikit-learn's f1_score(average='macro'))."""
  true_positive = np.diag(counts).astype(float)
  predicted = counts.sum(axis=0)
  actual = counts.sum(axis=1)
  denominator = predicted + actual
  f1 = np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), 0.0)
  return 100.0 * float(f1.mean())


def row_normalised(counts: np.ndarray) -> np.ndarray:
  """Rows as percentages of each true class, as in the paper's Tables 2 and 3."""
  return 100.0 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def summarise(counts: np.ndarray) -> dict[str, float]:
  return {
    "overall_accuracy": overall_accuracy(counts),
    "class_accuracy": class_accuracy(counts),
    "macro_f1": macro_f1(counts),
  }
