"""Cross-validation folds: stratified (the paper's), speaker-independent, or the corpus's own."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


class FoldError(ValueError):
  """Folds that cannot be made from this corpus with these settings."""


def check_stratifiable(class_counts: Mapping[str, int], n_folds: int) -> None:
  """Raises FoldError where a class has fewer examples than stratified folds need."""
  for name, count in class_counts.items():
    if count < 2:
      raise FoldError(
        f"class '{name}' has {count} usable example(s); stratified folds need two or more "
        "per class: drop it from data.classes (files that could not be used are logged as "
        "skipped)"
      )
    if count < n_folds:
      raise FoldError(
        f"cv.n_folds={n_folds} is more than class '{name}' has examples ({count}); "
        f"use cv.n_folds <= {count} or drop the class from data.classes"
      )


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

  'stratified': scikit-learn's StratifiedKFold, shuffled with `seed` (the paper's protocol;
  stratified_test_folds).
  'speaker': no speaker in both train and test. When there are exactly `n_folds` groups and
  more speakers than folds (IEMOCAP's five sessions with cv.n_folds=5) each fold holds out
  one whole group (leave-one-session-out); otherwise speakers are spread over folds with scikit-learn's
  StratifiedGroupKFold.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(class_names) or labels.max() + 1)
  if scheme == "stratified":
    names = class_names or [str(k) for k in range(len(counts))]
    check_stratifiable(dict(zip(names, counts.tolist(), strict=True)), n_folds)
    test_fold = stratified_test_folds(labels, n_folds, seed)
    splits = [
      (np.flatnonzero(test_fold != k), np.flatnonzero(test_fold == k)) for k in range(n_folds)
    ]
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
      # Imported here: scikit-learn takes 1.5 s to import, which no other path pays.
      from sklearn import model_selection

      splitter = model_selection.StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
      splits = splitter.split(np.zeros(len(labels)), labels, speakers)
  else:
    raise FoldError(
      f"unknown cv.scheme '{scheme}'; expected one of: speaker, stratified (and 'given', "
      "made by given_folds)"
    )
  return [(np.sort(train), np.sort(test)) for train, test in splits]


def stratified_test_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
  """Each example's test fold, as scikit-learn's StratifiedKFold(n_folds, shuffle=True,
  random_state=seed) assigns them (tests/test_folds.py checks they are its folds), in numpy:
  a run need not import scikit-learn for them.

  Classes, numbered in order of first appearance, are dealt round robin to the folds in
  sorted order; each class's fold numbers are then shuffled among its examples.
  """
  _, first_seen, class_of = np.unique(labels, return_index=True, return_inverse=True)
  _, appearance_rank = np.unique(first_seen, return_inverse=True)
  classes = appearance_rank[class_of]
  n_classes = len(first_seen)
  dealt = np.sort(classes)
  per_fold = np.stack([np.bincount(dealt[k::n_folds], minlength=n_classes) for k in range(n_folds)])
  rng = np.random.RandomState(seed)
  test_fold = np.empty(len(classes), np.int64)
  for c in range(n_classes):
    folds_of_class = np.repeat(np.arange(n_folds), per_fold[:, c])
    rng.shuffle(folds_of_class)
    test_fold[classes == c] = folds_of_class
  return test_fold


@dataclasses.dataclass(frozen=True)
class GivenFold:
  """One of a corpus's own folds, as indices into the roles it was made from."""

  name: str
  train: np.ndarray
  test: np.ndarray
  valid: np.ndarray  # Kept out of training and testing; counted, never used for selection.


def given_folds(roles: np.ndarray, fold_names: tuple[str, ...], corpus: str) -> list[GivenFold]:
  """The corpus's own folds from roles [N, n_folds] ('train', 'test', 'valid', '').

  An utterance is tested once in every fold that lists it as a test utterance.
  """
  roles = np.asarray(roles, dtype=object).reshape(len(roles), len(fold_names))
  if not fold_names:
    raise FoldError(
      f"cv.scheme='given' needs the corpus's own folds, and {corpus} has none: use "
      "data.corpus='emobox' (fold_<k> files), a csv manifest with a fold column, or iemocap "
      "(its sessions); or cv.scheme='stratified' or 'speaker'"
    )
  folds = []
  for k, name in enumerate(fold_names):
    column = roles[:, k]
    fold = GivenFold(
      name,
      np.flatnonzero(column == "train"),
      np.flatnonzero(column == "test"),
      np.flatnonzero(column == "valid"),
    )
    for part in ("train", "test"):
      if not len(getattr(fold, part)):
        raise FoldError(
          f"given fold {name} of {corpus} has no {part} utterance among the {len(roles)} used "
          "(see the files logged as skipped, and data.classes)"
        )
    folds.append(fold)
  return folds


def partition_line(roles: np.ndarray, corpus: str) -> tuple[bool, str]:
  """Whether the test sets of roles [N, n_folds] partition the N utterances, and one line
  saying so, with counts where they do not."""
  roles = np.asarray(roles, dtype=object)
  times_tested = (roles == "test").sum(axis=1)
  never, more = int((times_tested == 0).sum()), int((times_tested > 1).sum())
  if not (never or more):
    return (
      True,
      f"The {roles.shape[1]} given folds of {corpus} partition its {len(roles)} utterances",
    )
  return False, (
    f"The {roles.shape[1]} given folds of {corpus} do not partition its {len(roles)} "
    f"utterances: {never} are tested in no fold, {more} in more than one (tested once per fold "
    f"that lists them); {int((roles == '').all(axis=1).sum())} are in no fold at all"
  )


def session_roles(groups: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """IEMOCAP's sessions as folds: (roles [N, n_sessions], the session names)."""
  names = tuple(sorted(set(np.asarray(groups).tolist())))
  roles = np.where(np.asarray(groups)[:, None] == np.array(names)[None, :], "test", "train")
  return roles.astype(object), names
