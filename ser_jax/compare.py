"""Paired comparison of two runs' test predictions: WA and UA differences, intervals, p-values.

Differences are always B - A (`DIFFERENCE`): for a sweep, B is a focal-loss member and A the
gamma-0 member of the same seed, learning rate and alpha. WA and UA here pool every test
utterance (the unit that the tests resample), so they can differ slightly from results.json's
mean over folds; the per-fold table gives both runs' per-fold figures.

- 95% intervals: percentile bootstrap over utterances, resampled with replacement within
  each fold (within each (seed, fold) for a sweep), paired so that A and B see the same draws.
- WA p-value: exact McNemar test (two-sided binomial test on the discordant utterances).
- UA p-value: paired permutation test, swapping A's and B's predictions per utterance.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from ser_jax import layout, metrics, run_results
from ser_jax.results import PREDICTION_COLUMNS

DIFFERENCE = "B - A"
DEFAULT_RESAMPLES = 10_000
# Resampled index elements held at once (x 8 bytes): bounds memory for sweeps of big corpora.
_ELEMENTS_PER_BATCH = 4_000_000


class CompareError(ValueError):
  """Runs that cannot be compared, or a predictions.csv that cannot be read."""


# Metrics on arrays ------------------------------------------------------------------------------


def _class_weights(labels: np.ndarray) -> np.ndarray:
  """[n] weights that turn a sum of hits into UA (%): 100 / (support of the label * classes)."""
  _, inverse, support = np.unique(labels, return_inverse=True, return_counts=True)
  return 100.0 / (support[inverse] * len(support))


def wa_of(labels: np.ndarray, predictions: np.ndarray) -> float:
  """WA (%) of class-index arrays: correct / total (ser_jax.metrics.wa of their counts)."""
  return float(100.0 * np.mean(np.asarray(labels) == np.asarray(predictions)))


def ua_of(labels: np.ndarray, predictions: np.ndarray) -> float:
  """UA (%) of class-index arrays: the mean recall over the classes present in `labels`
  (balanced accuracy; ser_jax.metrics.ua of their counts)."""
  labels = np.asarray(labels)
  return float(_class_weights(labels) @ (labels == np.asarray(predictions)))


def mcnemar_exact(
  labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray
) -> tuple[int, int, float]:
  """(only A correct, only B correct, two-sided exact McNemar p-value) for the WA difference."""
  hits_a = np.asarray(labels) == np.asarray(predictions_a)
  hits_b = np.asarray(labels) == np.asarray(predictions_b)
  only_a, only_b = int(np.sum(hits_a & ~hits_b)), int(np.sum(~hits_a & hits_b))
  if only_a + only_b == 0:
    return only_a, only_b, 1.0
  return only_a, only_b, float(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


def ua_permutation_p_value(
  labels: np.ndarray,
  predictions_a: np.ndarray,
  predictions_b: np.ndarray,
  *,
  n_resamples: int = DEFAULT_RESAMPLES,
  seed: int = 0,
) -> float:
  """Two-sided p-value of the UA difference: A's and B's predictions swapped per utterance."""
  labels = np.asarray(labels)
  hits_a = labels == np.asarray(predictions_a)
  hits_b = labels == np.asarray(predictions_b)
  # Swapping an utterance that both got right (or both wrong) changes nothing, so only the
  # discordant ones are permuted: the same null distribution, at a fraction of the cost.
  discordant = hits_a != hits_b
  if discordant.sum() < 2:  # None, or one: its two permutations give -d and +d, so p = 1.
    return 1.0
  weights = _class_weights(labels)[discordant]

  def ua_difference(a, b, axis=-1):
    return np.moveaxis(b - a, axis, -1) @ weights

  result = stats.permutation_test(
    (hits_a[discordant].astype(float), hits_b[discordant].astype(float)),
    ua_difference,
    permutation_type="samples",
    vectorized=True,
    n_resamples=n_resamples,
    batch=max(1, _ELEMENTS_PER_BATCH // int(discordant.sum())),
    rng=np.random.default_rng(seed),
  )
  return float(min(result.pvalue, 1.0))


def stratified_indices(
  strata: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
  """[n_resamples, n] indices: each stratum's positions drawn with replacement from that stratum.

  With one stratum this is scipy.stats.bootstrap's draw, `rng.integers(0, n, (n_resamples, n))`.
  """
  strata = np.asarray(strata)
  columns = []
  for stratum in np.unique(strata):
    positions = np.flatnonzero(strata == stratum)
    columns.append(positions[rng.integers(0, len(positions), (n_resamples, len(positions)))])
  return np.concatenate(columns, axis=1)


def bootstrap_differences(
  labels: np.ndarray,
  predictions_a: np.ndarray,
  predictions_b: np.ndarray,
  strata: np.ndarray,
  *,
  n_resamples: int = DEFAULT_RESAMPLES,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Paired bootstrap distributions ([n_resamples] each) of the WA and UA differences B - A."""
  labels = np.asarray(labels)
  _, label_index = np.unique(labels, return_inverse=True)
  n_classes = int(label_index.max()) + 1
  hits_a = labels == np.asarray(predictions_a)
  hits_b = labels == np.asarray(predictions_b)
  # A resample's statistics depend only on how many of its utterances fall in each
  # (class, A right, B right) cell, so each resample reduces to one bincount.
  n_cells = 4 * n_classes
  cells = 4 * label_index + 2 * hits_a + hits_b
  rng = np.random.default_rng(seed)
  batch = max(1, _ELEMENTS_PER_BATCH // len(labels))
  wa, ua = [], []
  for start in range(0, n_resamples, batch):
    size = min(batch, n_resamples - start)
    drawn = cells[stratified_indices(strata, size, rng)]
    drawn += n_cells * np.arange(size)[:, None]
    counts = np.bincount(drawn.ravel(), minlength=size * n_cells).reshape(size, n_classes, 4)
    support = counts.sum(-1)
    right_a = counts[..., 2] + counts[..., 3]
    right_b = counts[..., 1] + counts[..., 3]
    wa.append(100.0 * (right_b - right_a).sum(-1) / len(labels))
    present = support > 0  # A class can be missing from a resample; UA skips it, as sklearn does.
    recall_gap = np.where(present, (right_b - right_a) / np.maximum(support, 1), 0.0)
    ua.append(100.0 * recall_gap.sum(-1) / present.sum(-1))
  return np.concatenate(wa), np.concatenate(ua)


def percentile_interval(
  distribution: np.ndarray, confidence_level: float = 0.95
) -> tuple[float, float]:
  """Percentile bootstrap interval (scipy.stats.bootstrap's method='percentile')."""
  tail = (1 - confidence_level) / 2
  low, high = np.quantile(distribution, [tail, 1 - tail])
  return float(low), float(high)


def per_fold(
  labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray, folds: np.ndarray
) -> list[dict]:
  """WA and UA of A and B and their differences (B - A) in each fold, in fold order."""
  labels, folds = np.asarray(labels), np.asarray(folds)
  predictions_a, predictions_b = np.asarray(predictions_a), np.asarray(predictions_b)
  rows = []
  for fold in np.unique(folds):
    mask = folds == fold
    row: dict = {"fold": int(fold), "n_test": int(mask.sum())}
    for name, metric in (("wa", wa_of), ("ua", ua_of)):
      row[f"{name}_a"] = metric(labels[mask], predictions_a[mask])
      row[f"{name}_b"] = metric(labels[mask], predictions_b[mask])
      row[f"{name}_difference"] = row[f"{name}_b"] - row[f"{name}_a"]
    rows.append(row)
  return rows


def compare_paired(
  labels: np.ndarray,
  predictions_a: np.ndarray,
  predictions_b: np.ndarray,
  folds: np.ndarray,
  *,
  strata: np.ndarray | None = None,
  n_resamples: int = DEFAULT_RESAMPLES,
  seed: int = 0,
) -> dict:
  """Every statistic of a paired comparison, JSON-ready; differences are B - A.

  Args:
    labels, predictions_a, predictions_b, folds: [n] per paired prediction (class indices).
    strata: [n] bootstrap strata; default `folds`.
  """
  labels = np.asarray(labels)
  if not (len(labels) == len(predictions_a) == len(predictions_b) == len(folds)) or not len(labels):
    raise CompareError(
      f"labels, predictions_a, predictions_b and folds must have one equal, non-zero length; "
      f"got {len(labels)}, {len(predictions_a)}, {len(predictions_b)} and {len(folds)}"
    )
  strata = folds if strata is None else strata
  wa_draws, ua_draws = bootstrap_differences(
    labels, predictions_a, predictions_b, strata, n_resamples=n_resamples, seed=seed
  )
  only_a, only_b, wa_p = mcnemar_exact(labels, predictions_a, predictions_b)
  result: dict = {"difference": DIFFERENCE, "n_paired_predictions": int(len(labels))}
  result["n_folds"] = int(len(np.unique(folds)))
  for name, metric, draws in (
    ("wa", wa_of, wa_draws),
    ("ua", ua_of, ua_draws),
  ):
    result[f"{name}_a"] = metric(labels, predictions_a)
    result[f"{name}_b"] = metric(labels, predictions_b)
    result[f"{name}_difference"] = result[f"{name}_b"] - result[f"{name}_a"]
    result[f"{name}_difference_ci95"] = list(percentile_interval(draws))
    # The sd of the same draws: the variance a meta-analysis weights this difference by.
    result[f"{name}_standard_error"] = float(np.std(draws, ddof=1))
  result["wa_p_value"] = wa_p
  result["wa_test"] = "exact McNemar"
  result["only_a_correct"], result["only_b_correct"] = only_a, only_b
  result["ua_p_value"] = ua_permutation_p_value(
    labels, predictions_a, predictions_b, n_resamples=n_resamples, seed=seed
  )
  result["ua_test"] = "paired permutation"
  result["interval_method"] = "percentile bootstrap, resampled within folds"
  result["n_resamples"], result["seed"] = int(n_resamples), int(seed)
  result["per_fold"] = per_fold(labels, predictions_a, predictions_b, folds)
  return result


# Reading runs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A run's predictions.csv as columns, one row per (utterance, fold, member)."""

  class_names: tuple[str, ...]
  utt_id: np.ndarray  # [n] str
  speaker: np.ndarray  # [n] str
  fold: np.ndarray  # [n] int
  member: np.ndarray  # [n] int
  label: np.ndarray  # [n] class index
  predicted: np.ndarray  # [n] class index
  probabilities: np.ndarray  # [n, n_classes]


@dataclasses.dataclass(frozen=True)
class Paired:
  """Two members' predictions on the same test utterances, sorted by (fold, utt_id)."""

  class_names: tuple[str, ...]
  utt_id: np.ndarray
  fold: np.ndarray
  label: np.ndarray
  predicted_a: np.ndarray
  predicted_b: np.ndarray


def load_predictions(workdir: str | os.PathLike) -> Predictions:
  """The run's predictions.csv; CompareError names the file, line and bad value."""
  path = pathlib.Path(workdir) / layout.PREDICTIONS
  if not path.is_file():
    raise CompareError(
      f"{path} does not exist; runs finished before ser_jax wrote per-utterance predictions "
      "cannot be compared (rerun them)"
    )
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    lines = list(reader)
  if header is None:
    raise CompareError(f"{path} is empty")
  missing = [c for c in PREDICTION_COLUMNS if c not in header]
  class_columns = [i for i, c in enumerate(header) if c.startswith("p_")]
  if missing or not class_columns:
    raise CompareError(
      f"{path}: header lacks {', '.join(missing) or 'p_<class> columns'}; expected "
      f"{','.join(PREDICTION_COLUMNS)},p_<class>,..."
    )
  class_names = tuple(header[i][2:] for i in class_columns)
  index = {name: k for k, name in enumerate(class_names)}
  column = {c: header.index(c) for c in PREDICTION_COLUMNS}
  values: dict[str, list] = {c: [] for c in PREDICTION_COLUMNS}
  probabilities = []
  for line_number, line in enumerate(lines, start=2):
    if len(line) != len(header):
      raise CompareError(f"{path}:{line_number}: {len(line)} fields, header has {len(header)}")
    row = {c: line[column[c]] for c in PREDICTION_COLUMNS}
    for name in ("fold", "member"):
      try:
        row[name] = int(row[name])
      except ValueError:
        raise CompareError(
          f"{path}:{line_number}: {name} {row[name]!r} is not an integer"
        ) from None
    for name in ("label", "predicted"):
      if row[name] not in index:
        raise CompareError(
          f"{path}:{line_number}: {name} {row[name]!r} is not one of the classes "
          f"{', '.join(class_names)}"
        )
      row[name] = index[row[name]]
    for name in PREDICTION_COLUMNS:
      values[name].append(row[name])
    probabilities.append([float(line[i]) for i in class_columns])
  keys = collections.Counter(zip(values["utt_id"], values["fold"], values["member"], strict=True))
  if len(keys) != len(lines):
    duplicate = next(k for k, count in keys.items() if count > 1)
    raise CompareError(
      f"{path}: utterance {duplicate[0]!r} appears more than once in fold {duplicate[1]} for "
      f"member {duplicate[2]}"
    )
  return Predictions(
    class_names=class_names,
    utt_id=np.array(values["utt_id"], dtype=str),
    speaker=np.array(values["speaker"], dtype=str),
    fold=np.array(values["fold"], dtype=np.int64),
    member=np.array(values["member"], dtype=np.int64),
    label=np.array(values["label"], dtype=np.int64),
    predicted=np.array(values["predicted"], dtype=np.int64),
    probabilities=np.array(probabilities, dtype=float).reshape(len(lines), len(class_names)),
  )


def _member_rows(predictions: Predictions, member: int, name: str) -> dict[tuple[str, int], int]:
  rows = np.flatnonzero(predictions.member == member)
  if not len(rows):
    members = ", ".join(map(str, np.unique(predictions.member))) or "none"
    raise CompareError(f"{name} has no predictions for member {member}; it has {members}")
  return {(str(predictions.utt_id[i]), int(predictions.fold[i])): int(i) for i in rows}


def _examples(keys: set[tuple[str, int]]) -> str:
  shown = sorted(keys, key=lambda k: (k[1], k[0]))[:3]
  more = ", ..." if len(keys) > 3 else ""
  return ", ".join(f"{utt} (fold {fold})" for utt, fold in shown) + more


def align(
  a: Predictions,
  b: Predictions,
  *,
  member_a: int = 0,
  member_b: int = 0,
  names: tuple[str, str] = ("run A", "run B"),
) -> Paired:
  """A's and B's predictions matched by (utt_id, fold); the two must cover the same set."""
  if a.class_names != b.class_names:
    raise CompareError(
      f"{names[0]} has classes {', '.join(a.class_names)} but {names[1]} has "
      f"{', '.join(b.class_names)}; compare runs trained on the same classes"
    )
  rows_a = _member_rows(a, member_a, names[0])
  rows_b = _member_rows(b, member_b, names[1])
  if rows_a.keys() != rows_b.keys():
    only_a, only_b = rows_a.keys() - rows_b.keys(), rows_b.keys() - rows_a.keys()
    detail = "; ".join(
      f"only in {name}: {_examples(keys)}"
      for name, keys in zip(names, (only_a, only_b), strict=True)
      if keys
    )
    raise CompareError(
      f"{names[0]} has {len(rows_a)} test predictions, {names[1]} {len(rows_b)}; "
      f"{len(only_a) + len(only_b)} utterances are in only one run ({detail}); compare runs of "
      "the same corpus and cross-validation folds"
    )
  keys = sorted(rows_a, key=lambda k: (k[1], k[0]))
  index_a = np.array([rows_a[k] for k in keys])
  index_b = np.array([rows_b[k] for k in keys])
  disagree = np.flatnonzero(a.label[index_a] != b.label[index_b])
  if len(disagree):
    utt, fold = keys[disagree[0]]
    raise CompareError(
      f"utterance {utt} (fold {fold}) is labelled {a.class_names[a.label[index_a[disagree[0]]]]} "
      f"in {names[0]} but {b.class_names[b.label[index_b[disagree[0]]]]} in {names[1]} "
      f"({len(disagree)} such utterances); compare runs of the same corpus and labels"
    )
  return Paired(
    class_names=a.class_names,
    utt_id=a.utt_id[index_a],
    fold=a.fold[index_a],
    label=a.label[index_a],
    predicted_a=a.predicted[index_a],
    predicted_b=b.predicted[index_b],
  )


# Provenance and consistency ---------------------------------------------------------------------


def provenance_differences(
  provenance_a: Mapping | None, provenance_b: Mapping | None
) -> dict[str, list]:
  """{key: [A's value, B's value]} for every key whose values differ; a missing key is None."""
  provenance_a, provenance_b = provenance_a or {}, provenance_b or {}
  keys = list(provenance_a) + [k for k in provenance_b if k not in provenance_a]
  return {
    k: [provenance_a.get(k), provenance_b.get(k)]
    for k in keys
    if provenance_a.get(k) != provenance_b.get(k)
  }


def compare_runs(
  predictions_a: Predictions,
  predictions_b: Predictions,
  results_a: run_results.RunResults,
  results_b: run_results.RunResults,
  *,
  member_a: int = 0,
  member_b: int = 0,
  n_resamples: int = DEFAULT_RESAMPLES,
  seed: int = 0,
) -> dict:
  """`compare_paired` on two runs' aligned predictions, with their provenance differences."""
  for name, predictions, results in (
    ("A", predictions_a, results_a),
    ("B", predictions_b, results_b),
  ):
    if results.class_names != predictions.class_names:
      raise CompareError(
        f"run {name}'s results.json has classes {', '.join(results.class_names)} but its "
        f"predictions.csv has {', '.join(predictions.class_names)}; the run directory is mixed"
      )
  paired = align(predictions_a, predictions_b, member_a=member_a, member_b=member_b)
  result = {
    "member_a": member_a,
    "member_b": member_b,
    "n_utterances": int(len(paired.label)),
    **compare_paired(
      paired.label,
      paired.predicted_a,
      paired.predicted_b,
      paired.fold,
      n_resamples=n_resamples,
      seed=seed,
    ),
  }
  result["provenance_recorded"] = [r.provenance is not None for r in (results_a, results_b)]
  result["provenance_differences"] = provenance_differences(
    results_a.provenance, results_b.provenance
  )
  return result


def _parse_alpha(text):
  """'none' or '' -> (); 'inverse_frequency' as it is; '1,2,1,1' -> weights."""
  if not isinstance(text, str):
    return text
  text = text.strip().strip("()[]")
  if text in ("", "none"):
    return ()
  if text[0].isalpha():
    return text
  return tuple(float(part) for part in text.split(",") if part.strip())


def _alpha_key(alpha) -> tuple[float, ...] | str | None:
  if alpha is None or len(alpha) == 0:
    return None
  return alpha if isinstance(alpha, str) else tuple(float(a) for a in alpha)


def _setting(member: run_results.MemberResults) -> dict:
  alpha = member.alpha if isinstance(member.alpha, str) else list(member.alpha)
  return {
    "gamma": float(member.gamma),
    "learning_rate": float(member.learning_rate),
    "alpha": None if _alpha_key(alpha) is None else alpha,
  }


def describe_setting(setting: Mapping) -> str:
  """'gamma=2, lr=0.001, alpha=inverse_frequency' for a sweep setting."""
  alpha = setting["alpha"]
  if alpha is None:
    alpha_text = "none"
  elif isinstance(alpha, str):
    alpha_text = alpha
  else:
    alpha_text = "[" + ", ".join(f"{a:g}" for a in alpha) + "]"
  return f"gamma={setting['gamma']:g}, lr={setting['learning_rate']:g}, alpha={alpha_text}"


def compare_sweep(
  predictions: Predictions,
  results: run_results.RunResults,
  *,
  n_resamples: int = DEFAULT_RESAMPLES,
  seed: int = 0,
  reference_alpha=None,
) -> dict:
  """Each (gamma, learning rate, alpha) setting against gamma 0, paired per seed and pooled.

  The reference is the gamma-0 member of the same seed, learning rate and alpha; with
  `reference_alpha` ('none', 'inverse_frequency' or weights) it is the gamma-0 member with
  that alpha for every other setting (e.g. every setting against weighted cross entropy).
  The units are (seed, utterance) pairs; the bootstrap resamples within each (seed, fold).
  McNemar's test and the permutation test take the pairs as independent, which seeds that
  share test utterances only approximate: read their p-values as a guide.
  """
  sweep = results.members
  if not results.is_sweep:
    raise CompareError(
      "results.json has one member, not a sweep; compare a single run with another: "
      "--compare RUN_A RUN_B"
    )
  if results.class_names != predictions.class_names:
    raise CompareError(
      f"results.json has classes {', '.join(results.class_names)} but predictions.csv has "
      f"{', '.join(predictions.class_names)}; the run directory is mixed"
    )
  fixed = None if reference_alpha is None else _alpha_key(_parse_alpha(reference_alpha))

  def reference_key(member) -> tuple:
    alpha = _alpha_key(member.alpha) if reference_alpha is None else fixed
    return (member.seed, float(member.learning_rate), alpha)

  references: dict[tuple, int] = {}
  settings: dict[tuple, list[int]] = {}
  for k, member in enumerate(sweep):
    key = (float(member.learning_rate), _alpha_key(member.alpha))
    is_reference = float(member.gamma) == 0.0 and (
      reference_alpha is None or _alpha_key(member.alpha) == fixed
    )
    if is_reference:
      references.setdefault((member.seed, *key), k)
    else:
      settings.setdefault((float(member.gamma), *key), []).append(k)
  if not references:
    gammas = ", ".join(sorted({f"{float(m.gamma):g}" for m in sweep}))
    raise CompareError(
      f"the sweep has no gamma-0 member (gammas: {gammas}); each gamma is compared with gamma 0 "
      "of the same seed, so include 0 in sweep.gammas"
    )
  comparisons = []
  for members in settings.values():
    reference_members, parts = [], []
    for pair, k in enumerate(members):
      member = sweep[k]
      reference = references.get(reference_key(member))
      if reference is None:
        raise CompareError(
          f"sweep member {k} ({describe_setting(_setting(member))}, seed {member.seed}) has no "
          "gamma-0 member with the same seed, learning rate and alpha to be compared with"
        )
      reference_members.append(reference)
      paired = align(
        predictions,
        predictions,
        member_a=reference,
        member_b=k,
        names=(f"member {reference}", f"member {k}"),
      )
      parts.append((pair, paired))
    fold = np.concatenate([p.fold for _, p in parts])
    pair_index = np.concatenate([np.full(len(p.fold), pair) for pair, p in parts])
    _, strata = np.unique(np.stack([pair_index, fold], axis=1), axis=0, return_inverse=True)
    result = compare_paired(
      np.concatenate([p.label for _, p in parts]),
      np.concatenate([p.predicted_a for _, p in parts]),
      np.concatenate([p.predicted_b for _, p in parts]),
      fold,
      strata=strata.ravel(),
      n_resamples=n_resamples,
      seed=seed,
    )
    first = sweep[members[0]]
    comparisons.append(
      {
        "setting": _setting(first),
        "reference": _setting(sweep[reference_members[0]]),
        "seeds": [sweep[k].seed for k in members],
        "members": members,
        "reference_members": reference_members,
        "n_utterances": int(len(parts[0][1].label)),
        **result,
        "interval_method": "percentile bootstrap, resampled within (seed, fold)",
      }
    )
  return {"difference": DIFFERENCE, "comparisons": comparisons}


def consistency_problems(workdir: str | os.PathLike) -> list[str]:
  """Where results.json's figures do not follow from predictions.csv; empty when they all do.

  Checks the classes, the members, the folds and every member's per-fold test sizes and
  confusion counts, from which results.json's scores follow (ser_jax.run_results).
  """
  workdir = pathlib.Path(workdir)
  predictions = load_predictions(workdir)
  results = run_results.read(workdir)
  if results.class_names != predictions.class_names:
    return [
      f"classes: results.json {', '.join(results.class_names)}, predictions.csv "
      f"{', '.join(predictions.class_names)}"
    ]
  problems = []
  n_classes = len(predictions.class_names)
  members = sorted(set(predictions.member.tolist()))
  if members != list(range(len(results.members))):
    problems.append(
      f"members: results.json has {len(results.members)}, predictions.csv has {members}"
    )
  folds = sorted(set(predictions.fold.tolist()))
  written = sorted(f.fold for f in results.members[0].folds)
  if folds != written:
    problems.append(f"folds: results.json has {written}, predictions.csv has {folds}")
    return problems
  for k, member in enumerate(results.members):
    for fold in member.folds:
      mask = (predictions.member == k) & (predictions.fold == fold.fold)
      counts = metrics.confusion_counts(
        predictions.label[mask], predictions.predicted[mask], n_classes
      ).tolist()
      if counts != [list(row) for row in fold.confusion_counts] or fold.n_test != mask.sum():
        problems.append(
          f"member {k}, fold {fold.fold}: confusion counts {fold.confusion_counts} of "
          f"{fold.n_test} tests in results.json, {counts} of {int(mask.sum())} from "
          "predictions.csv"
        )
  return problems


def check_consistent(workdir: str | os.PathLike) -> None:
  """Raises CompareError listing `consistency_problems`, if any."""
  problems = consistency_problems(workdir)
  if problems:
    raise CompareError(
      f"{workdir}: results.json does not follow from predictions.csv: " + "; ".join(problems)
    )


def json_ready(value):
  """`value` with numpy scalars and tuples turned into plain JSON types."""
  if isinstance(value, Mapping):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, Sequence) and not isinstance(value, str):
    return [json_ready(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_ready(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value
