"""Cross-validation folds: stratified (the paper's) or speaker-independent."""

from __future__ import annotations

import numpy as np
from sklearn import model_selection


class FoldError(ValueError):
  """Folds that cannot be made from this corpus with these settings."""


def make_folds(
  labels: np.ndarray,
  speakers: np.ndarray,
  groups: np.ndarray,
  *,
  scheme: str,
  n_folds: int,
  seed: int,
  class_names: tuple[str, ...] = (),
) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train_indices, test_indices) per fold, sorted; every example is tested exactly once.

  'stratified': scikit-learn StratifiedKFold, shuffled with `seed` (the paper's protocol).
  'speaker': no speaker in both train and test. When there are exactly `n_folds` groups
  (IEMOCAP's five sessions with cv.n_folds=5) each fold holds out one whole group
  (leave-one-session-out); otherwise speakers are spread over folds with
  StratifiedGroupKFold.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(class_names) or labels.max() + 1)
  if scheme == "stratified":
    smallest = int(counts.min())
    if smallest < n_folds:
      name = class_names[int(counts.argmin())] if class_names else str(int(counts.argmin()))
      raise FoldError(
        f"cv.n_folds={n_folds} is more than class '{name}' has examples ({smallest}); "
        f"use cv.n_folds <= {smallest} or drop the class from data.classes"
      )
    splitter = model_selection.StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    splits = splitter.split(np.zeros(len(labels)), labels)
  elif scheme == "speaker":
    unique_groups = np.unique(groups)
    if len(unique_groups) == n_folds and len(np.unique(speakers)) > n_folds:
      splits = [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in unique_groups]
    else:
      n_speakers = len(np.unique(speakers))
      if n_speakers < n_folds:
        raise FoldError(
          f"cv.scheme='speaker' needs at least cv.n_folds={n_folds} speakers; the corpus has "
          f"{n_speakers}; lower cv.n_folds"
        )
      splitter = model_selection.StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
      splits = splitter.split(np.zeros(len(labels)), labels, speakers)
  else:
    raise FoldError(f"unknown cv.scheme '{scheme}'; expected one of: speaker, stratified")
  return [(np.sort(train), np.sort(test)) for train, test in splits]
