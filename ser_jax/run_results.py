"""A run's results.json as types: folds, members and the run, every score derived from counts.

`FoldResults` keeps a fold's confusion counts; WA, UA and macro F1 (ser_jax.metrics) follow
from them, and a member's means over folds and pooled scores from its folds', so no reader
can disagree with itself. `write` and `read` are the only way to a run's results.json: layout 2
(`schema_version: 2`) writes every score out as numbers for jq; `read` derives them again
from the counts, and reads the older layout too (see `from_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from ser_jax import io_utils, layout, metrics

SCHEMA_VERSION = 2


class ResultsError(ValueError):
  """A results.json that cannot be read: missing, not JSON, or lacking a key."""


def _counts_tuple(counts) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(int(v) for v in row) for row in np.asarray(counts))


def _over_folds(score: str, statistic) -> property:
  """A member's `statistic` (np.mean, or np.std: the population sd) of its folds' `score`."""
  return property(lambda member: float(statistic([getattr(f, score) for f in member.folds])))


def _pooled(score: str) -> property:
  """A member's `score` (ser_jax.metrics' function of that name) of its pooled counts."""
  return property(lambda member: getattr(metrics, score)(member.confusion_counts_pooled))


@dataclasses.dataclass(frozen=True)
class GivenFold:
  """A corpus's own fold (cv.scheme='given'): its name and its valid split's size (unused)."""

  name: str
  n_valid: int


@dataclasses.dataclass(frozen=True)
class FoldResults:
  """One member's test of one fold.

  confusion_counts: [true][predicted] counts of its n_test utterances (any array-like; kept
  as nested tuples).
  """

  fold: int
  n_train: int
  n_test: int
  confusion_counts: tuple[tuple[int, ...], ...]
  given_fold: GivenFold | None = None

  def __post_init__(self):
    object.__setattr__(self, "confusion_counts", _counts_tuple(self.confusion_counts))
    counted = sum(map(sum, self.confusion_counts))
    if counted != self.n_test:
      raise ValueError(
        f"fold {self.fold}: confusion counts sum to {counted}, but n_test is {self.n_test}"
      )

  @property
  def wa(self) -> float:
    return metrics.wa(self.confusion_counts)

  @property
  def ua(self) -> float:
    return metrics.ua(self.confusion_counts)

  @property
  def macro_f1(self) -> float:
    return metrics.macro_f1(self.confusion_counts)


@dataclasses.dataclass(frozen=True)
class MemberResults:
  """One model of a run (one of a sweep's): its hyper-parameters and its folds.

  `<score>_fold_mean` / `_fold_std` are the mean and (population) sd over folds, as the
  paper and EmoBox's leaderboard give them; `<score>_pooled` scores every test prediction
  at once (an utterance tested in two folds counts twice).
  """

  gamma: float
  seed: int
  learning_rate: float
  alpha: tuple[float, ...] | str  # Per-class weights, 'inverse_frequency', or () for none.
  folds: tuple[FoldResults, ...]

  def __post_init__(self):
    alpha = self.alpha if isinstance(self.alpha, str) else tuple(float(a) for a in self.alpha)
    object.__setattr__(self, "alpha", alpha)
    object.__setattr__(self, "folds", tuple(self.folds))

  wa_fold_mean = _over_folds("wa", np.mean)
  wa_fold_std = _over_folds("wa", np.std)
  ua_fold_mean = _over_folds("ua", np.mean)
  ua_fold_std = _over_folds("ua", np.std)
  macro_f1_fold_mean = _over_folds("macro_f1", np.mean)
  macro_f1_fold_std = _over_folds("macro_f1", np.std)
  wa_pooled = _pooled("wa")
  ua_pooled = _pooled("ua")
  macro_f1_pooled = _pooled("macro_f1")

  @property
  def confusion_counts_pooled(self) -> np.ndarray:
    """[true, predicted] counts summed over folds."""
    return np.sum([np.asarray(f.confusion_counts) for f in self.folds], axis=0)

  @property
  def confusion_matrix_pooled(self) -> np.ndarray:
    """The pooled counts as % of each true class (the paper's Tables 2 and 3)."""
    return metrics.row_normalised(self.confusion_counts_pooled)

  @property
  def per_class_recall_pooled(self) -> np.ndarray:
    """[n_classes] recall (%) of each class over the pooled counts."""
    return metrics.per_class_recall(self.confusion_counts_pooled)

  @property
  def n_test_pooled(self) -> int:
    return int(sum(f.n_test for f in self.folds))

  def hyperparameters(self) -> dict:
    """gamma, seed, learning_rate and alpha as results.json gives them."""
    alpha = self.alpha if isinstance(self.alpha, str) else list(self.alpha)
    return {
      "gamma": self.gamma,
      "seed": self.seed,
      "learning_rate": self.learning_rate,
      "alpha": alpha,
    }


@dataclasses.dataclass(frozen=True)
class RunResults:
  """A finished run: its classes, its members (member 0 is the run's model; a sweep has
  more), its config (as config.json holds it) and what produced it."""

  class_names: tuple[str, ...]
  members: tuple[MemberResults, ...]
  config: dict
  num_params: int | None = None
  feature_store: str | None = None
  skipped_files: list = dataclasses.field(default_factory=list)
  class_counts: dict = dataclasses.field(default_factory=dict)
  provenance: dict | None = None
  wall_seconds: float | None = None
  n_folds: int | None = None  # The protocol's folds; `members`' are those of them finished.

  def __post_init__(self):
    object.__setattr__(self, "class_names", tuple(self.class_names))
    object.__setattr__(self, "members", tuple(self.members))
    n = len(self.class_names)
    for k, member in enumerate(self.members):
      for fold in member.folds:
        shape = np.shape(fold.confusion_counts)
        if shape != (n, n):
          raise ValueError(
            f"member {k}, fold {fold.fold}: confusion counts of shape {shape}, expected "
            f"{n}x{n} for classes {', '.join(self.class_names)}"
          )

  @property
  def is_sweep(self) -> bool:
    return len(self.members) > 1

  @property
  def folds_label(self) -> str:
    """How many folds it reports: '5', or '2 of 5' before every fold has finished."""
    done = len(self.members[0].folds)
    return f"{done} of {self.n_folds}" if self.n_folds and done < self.n_folds else str(done)

  def to_json(self) -> dict:
    """Layout 2: run-level fields, then `members`, each with every score and its folds."""
    return {
      "schema_version": SCHEMA_VERSION,
      "class_names": list(self.class_names),
      "members": [_member_json(m, self.class_names) for m in self.members],
      "num_params": self.num_params,
      "feature_store": self.feature_store,
      "skipped_files": self.skipped_files,
      "class_counts": self.class_counts,
      "provenance": self.provenance,
      "config": self.config,
      "wall_seconds": self.wall_seconds,
      "n_folds": self.n_folds,
    }

  @classmethod
  def from_json(cls, document: Mapping, workdir: str | os.PathLike | None = None) -> RunResults:
    """From layout 2, or from layout 1 (no schema_version: member 0's folds at the top level
    and a sweep's other members as means only, whose per-fold counts are rebuilt from the
    run's predictions.csv in `workdir`). KeyError names a missing key."""
    version = document.get("schema_version", 1)
    if version == 1:
      return _from_v1(document, workdir)
    if version != SCHEMA_VERSION:
      raise ValueError(
        f"schema_version {version!r} is not one this ser_jax reads (1 or {SCHEMA_VERSION})"
      )
    return cls(
      class_names=document["class_names"],
      members=[_member_from_json(m) for m in document["members"]],
      config=document["config"],
      num_params=document["num_params"],
      feature_store=document["feature_store"],
      skipped_files=document["skipped_files"],
      class_counts=document["class_counts"],
      provenance=document["provenance"],
      wall_seconds=document["wall_seconds"],
      n_folds=document.get("n_folds"),
    )


def _member_json(member: MemberResults, class_names: Sequence[str]) -> dict:
  scores = {}
  for name in ("wa", "ua", "macro_f1"):
    for over in ("fold_mean", "fold_std", "pooled"):
      scores[f"{name}_{over}"] = getattr(member, f"{name}_{over}")
  return {
    **member.hyperparameters(),
    **scores,
    "n_test_pooled": member.n_test_pooled,
    "per_class_recall_pooled": dict(
      zip(class_names, member.per_class_recall_pooled.tolist(), strict=True)
    ),
    "confusion_counts_pooled": member.confusion_counts_pooled.tolist(),
    "confusion_matrix_pooled": member.confusion_matrix_pooled.tolist(),
    "folds": [_fold_json(f) for f in member.folds],
  }


def _fold_json(fold: FoldResults) -> dict:
  out = {
    "fold": fold.fold,
    "n_train": fold.n_train,
    "n_test": fold.n_test,
    "wa": fold.wa,
    "ua": fold.ua,
    "macro_f1": fold.macro_f1,
    "confusion_counts": [list(row) for row in fold.confusion_counts],
  }
  if fold.given_fold is not None:
    out["given_fold"] = dataclasses.asdict(fold.given_fold)
  return out


def _fold_from_json(fold: Mapping) -> FoldResults:
  given = fold.get("given_fold")
  return FoldResults(
    fold=fold["fold"],
    n_train=fold["n_train"],
    n_test=fold["n_test"],
    confusion_counts=fold["confusion_counts"],
    given_fold=None if given is None else GivenFold(given["name"], given["n_valid"]),
  )


def _member_from_json(member: Mapping) -> MemberResults:
  return MemberResults(
    gamma=member["gamma"],
    seed=member["seed"],
    learning_rate=member["learning_rate"],
    alpha=member["alpha"],
    folds=[_fold_from_json(f) for f in member["folds"]],
  )


def _from_v1(document: Mapping, workdir) -> RunResults:
  """Layout 1: member 0's folds (with counts and sizes) at the top level; a sweep's entries
  under `sweep` hold only WA/UA means, so members k > 0 are rebuilt from predictions.csv."""
  folds = [_fold_from_json(f) for f in document["folds"]]
  config = document["config"]
  entries = document.get("sweep") or [_v1_single_member(config)]
  members = [MemberResults(**_v1_hyperparameters(entries[0]), folds=folds)]
  if len(entries) > 1:
    members += _v1_sweep_members(entries, folds, len(document["class_names"]), workdir)
  return RunResults(
    class_names=document["class_names"],
    members=members,
    config=config,
    num_params=document.get("num_params"),
    feature_store=document.get("feature_store"),
    skipped_files=document.get("skipped_files", []),
    class_counts=document.get("class_counts", {}),
    provenance=document.get("provenance"),
    wall_seconds=document.get("wall_seconds"),
  )


def _v1_single_member(config: Mapping) -> dict:
  """A single run's hyper-parameters from its config, as ser_jax.engine.members_of takes them."""
  loss = config["loss"]
  return {
    "gamma": float(loss["gamma"]) if loss["name"] == "focal" else 0.0,
    "seed": int(config["seed"]),
    "learning_rate": float(config["train"]["learning_rate"]),
    "alpha": loss.get("alpha", ()),
  }


def _v1_hyperparameters(entry: Mapping) -> dict:
  return {
    "gamma": float(entry["gamma"]),
    "seed": int(entry["seed"]),
    "learning_rate": float(entry["learning_rate"]),
    "alpha": entry.get("alpha") or (),
  }


def _v1_sweep_members(entries, folds: Sequence[FoldResults], n_classes: int, workdir):
  """Members 1.. of a layout-1 sweep: each fold's counts from predictions.csv, its training
  size member 0's (every member trains on the same folds)."""
  path = None if workdir is None else pathlib.Path(workdir) / layout.PREDICTIONS
  if path is None or not path.is_file():
    raise ResultsError(
      f"{path or layout.PREDICTIONS}: missing; results.json has the old layout (no "
      "schema_version), which keeps per-fold counts for sweep member 0 only, so the other "
      f"{len(entries) - 1} members are rebuilt from predictions.csv beside it"
    )
  # Imported here: compare reads runs through this module.
  from ser_jax import compare

  predictions = compare.load_predictions(path.parent)
  members = []
  for k, entry in enumerate(entries[1:], start=1):
    member_folds = []
    for fold in folds:
      rows = (predictions.member == k) & (predictions.fold == fold.fold)
      if not rows.any():
        raise ResultsError(f"{path}: no predictions of sweep member {k} in fold {fold.fold}")
      counts = metrics.confusion_counts(
        predictions.label[rows], predictions.predicted[rows], n_classes
      )
      member_folds.append(
        dataclasses.replace(fold, n_test=int(rows.sum()), confusion_counts=counts)
      )
    members.append(MemberResults(**_v1_hyperparameters(entry), folds=member_folds))
  return members


def write(workdir: str | os.PathLike, results: RunResults) -> None:
  """<workdir>/results.json, atomically (a crash leaves the previous file)."""
  io_utils.atomic_write_json(pathlib.Path(workdir) / layout.RESULTS, results.to_json())


def read(workdir: str | os.PathLike) -> RunResults:
  """<workdir>/results.json, either layout; ResultsError names the file and what is wrong."""
  path = pathlib.Path(workdir) / layout.RESULTS
  if not path.is_file():
    raise ResultsError(f"{path} does not exist (not a run directory, or the run is unfinished)")
  try:
    document = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ResultsError(f"{path}: unreadable ({error})") from error
  if not isinstance(document, dict):
    raise ResultsError(f"{path}: not a JSON object")
  try:
    return RunResults.from_json(document, path.parent)
  except ResultsError:
    raise
  except KeyError as error:
    raise ResultsError(f"{path}: missing key {error}") from error
  except (TypeError, ValueError) as error:
    raise ResultsError(f"{path}: {error}") from error
