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


def micro_f1(counts: np.ndarray) -> float:
  """Micro-averaged F1, percent (scikit-learn's f1_score(average='micro')): with one label per
  example, every error is a false positive and a false negative, so it equals WA."""
  return overall_accuracy(counts)


def macro_f1_present(counts: np.ndarray) -> float:
  """Macro F1, percent, over the classes in the labels or the predictions: scikit-learn's
  f1_score(average='macro') without `labels`, as EmoBox's EmoEval calls it. `macro_f1` also
  counts a class absent from both, as 0."""
  present = (counts.sum(axis=0) + counts.sum(axis=1)) > 0
  return macro_f1(counts[np.ix_(present, present)])


def emobox_scores(counts: np.ndarray) -> dict[str, float]:
  """What EmoBox's EmoEval reports of a set of predictions, percent: WA (accuracy), UA
  (balanced accuracy), micro F1 and macro F1, as scikit-learn computes them."""
  return {
    "wa": overall_accuracy(counts),
    "ua": class_accuracy(counts),
    "micro_f1": micro_f1(counts),
    "macro_f1": macro_f1_present(counts),
  }


def row_normalised(counts: np.ndarray) -> np.ndarray:
  """Rows as percentages of each true class, as in the paper's Tables 2 and 3."""
  return 100.0 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def summarise(counts: np.ndarray) -> dict[str, float]:
  return {
    "overall_accuracy": overall_accuracy(counts),
    "class_accuracy": class_accuracy(counts),
    "macro_f1": macro_f1(counts),
  }
