"""The paper's claim as the project tests it: a corpus resampled to IEMOCAP's class shares,
focal loss against softmax on the same folds, compared utterance by utterance; and the
comparison's statistics against values computed another way (scikit-learn, scipy's
binomial test, a permutation test by hand, simulations with a known effect and with none)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import run_module, tiny_args
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from ser_jax import compare, run_results
from ser_jax.report import main as report

IEMOCAP_COUNTS = "(1099,284,608,289)"


def _read_predictions(workdir) -> dict[str, tuple[int, str, str]]:
  """{utt_id: (fold, label, predicted)} from a one-member run's predictions.csv."""
  with open(workdir / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert {row["member"] for row in rows} == {"0"}
  return {row["utt_id"]: (int(row["fold"]), row["label"], row["predicted"]) for row in rows}


def _class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """UA (%) of predictions [..., n]: the mean over the classes in `labels` of their recall."""
  return 100 * np.mean(
    [np.mean(predictions[..., labels == c] == c, axis=-1) for c in np.unique(labels)], axis=0
  )


def _permutation_p_value(labels, predictions_a, predictions_b, n_resamples=4000, seed=0):
  """Two-sided p of the UA difference, swapping A's and B's predictions at random per
  utterance (every utterance, not only the discordant ones)."""
  swap = np.random.default_rng(seed).random((n_resamples, len(labels))) < 0.5
  a = np.where(swap, predictions_b, predictions_a)
  b = np.where(swap, predictions_a, predictions_b)
  null = _class_accuracy(labels, b) - _class_accuracy(labels, a)
  observed = _class_accuracy(labels, predictions_b) - _class_accuracy(labels, predictions_a)
  as_large = np.sum(np.abs(null) >= abs(observed) - 1e-9)
  return (as_large + 1) / (n_resamples + 1)


@pytest.mark.slow  # The study runs the claim end to end in the default run: test_study.py.
def test_focal_against_softmax_at_iemocap_shares(tmp_path, capsys):
  cache = tmp_path / "cache"
  runs = {}
  for loss in ("softmax", "focal"):
    runs[loss] = tmp_path / loss
    args = tiny_args(runs[loss], cache, **{"loss.name": loss, "data.class_shares": IEMOCAP_COUNTS})
    done = run_module("ser_jax.main", args)
    assert done.returncode == 0, done.stderr
  focal_results = run_results.read(runs["focal"])
  counts = focal_results.class_counts
  used = np.array(list(counts["used"].values()))
  # The largest subset at IEMOCAP's shares: each class within one utterance of its share,
  # and the limiting class kept whole.
  shares = np.array([1099, 284, 608, 289]) / 2280
  assert np.all(np.abs(used - used.sum() * shares) < 1)
  assert np.any(used == np.array(list(counts["corpus"].values())))
  assert focal_results.members[0].n_test_pooled == used.sum()
  for run in runs.values():
    compare.check_consistent(run)  # results.json recomputed from predictions.csv.
  argv = ["--compare", str(runs["softmax"]), str(runs["focal"]), "--json", "--resamples", "2000"]
  assert report(argv) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["n_utterances"] == used.sum()
  assert result["provenance_differences"] == {}

  # Every statistic again from the two predictions.csv files: A is softmax, B focal.
  softmax, focal = _read_predictions(runs["softmax"]), _read_predictions(runs["focal"])
  assert softmax.keys() == focal.keys()
  utterances = sorted(softmax)
  folds = np.array([softmax[u][0] for u in utterances])
  labels = np.array([softmax[u][1] for u in utterances])
  assert [focal[u][:2] for u in utterances] == [softmax[u][:2] for u in utterances]
  predicted_a = np.array([softmax[u][2] for u in utterances])
  predicted_b = np.array([focal[u][2] for u in utterances])
  want = {
    "wa_a": 100 * accuracy_score(labels, predicted_a),
    "wa_b": 100 * accuracy_score(labels, predicted_b),
    "ua_a": 100 * balanced_accuracy_score(labels, predicted_a),
    "ua_b": 100 * balanced_accuracy_score(labels, predicted_b),
  }
  want["wa_difference"] = want["wa_b"] - want["wa_a"]
  want["ua_difference"] = want["ua_b"] - want["ua_a"]
  assert {k: result[k] for k in want} == pytest.approx(want, abs=1e-9)
  right_a, right_b = labels == predicted_a, labels == predicted_b
  only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
  assert (result["only_a_correct"], result["only_b_correct"]) == (only_a, only_b)
  mcnemar = stats.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
  assert result["wa_p_value"] == pytest.approx(mcnemar, rel=1e-9)
  assert _class_accuracy(labels, predicted_a) == pytest.approx(want["ua_a"])
  permutation = _permutation_p_value(labels, predicted_a, predicted_b)
  assert result["ua_p_value"] == pytest.approx(permutation, abs=0.06)  # 4.5 standard errors
  low, high = result["ua_difference_ci95"]
  assert low <= result["ua_difference"] <= high
  per_fold = result["per_fold"]
  assert [f["fold"] for f in per_fold] == sorted(set(folds.tolist()))
  assert [f["n_test"] for f in per_fold] == [f.n_test for f in focal_results.members[0].folds]
  for row in per_fold:
    mask = folds == row["fold"]
    ua_a = 100 * balanced_accuracy_score(labels[mask], predicted_a[mask])
    ua_b = 100 * balanced_accuracy_score(labels[mask], predicted_b[mask])
    assert row["ua_difference"] == pytest.approx(ua_b - ua_a, abs=1e-9)
    wa_a = 100 * accuracy_score(labels[mask], predicted_a[mask])
    wa_b = 100 * accuracy_score(labels[mask], predicted_b[mask])
    assert row["wa_difference"] == pytest.approx(wa_b - wa_a, abs=1e-9)


# Simulated comparisons ---------------------------------------------------------------------------

# IEMOCAP improvised's class shares over 300 utterances, in 5 folds stratified by class.
_COUNTS = np.array([145, 37, 80, 38])
_LABELS = np.repeat(np.arange(4), _COUNTS)
_FOLDS = np.concatenate([np.arange(n) % 5 for n in _COUNTS])


def _noisy(accuracy: float, rng: np.random.Generator) -> np.ndarray:
  """Predictions right with probability `accuracy`, otherwise the next class."""
  return np.where(rng.random(len(_LABELS)) < accuracy, _LABELS, (_LABELS + 1) % 4)


def test_a_known_effect_is_measured_exactly_and_its_interval_excludes_zero():
  """B is A corrected on k_c of A's mistakes in class c: the UA difference is exactly
  100 / 4 * sum_c k_c / n_c and the WA difference 100 * sum_c k_c / n; A against B is the
  mirror image (the same draws, negated)."""
  rng = np.random.default_rng(0)
  predictions_a = _noisy(0.6, rng)
  predictions_b = predictions_a.copy()
  corrected = np.array([10, 8, 10, 8])
  for c, k in enumerate(corrected):
    wrong = np.flatnonzero((_LABELS == c) & (predictions_a != c))
    predictions_b[rng.choice(wrong, k, replace=False)] = c
  ua_effect = 100 / 4 * np.sum(corrected / _COUNTS)
  wa_effect = 100 * corrected.sum() / len(_LABELS)

  result = compare.compare_paired(_LABELS, predictions_a, predictions_b, _FOLDS, n_resamples=2000)
  assert result["ua_difference"] == pytest.approx(ua_effect, abs=1e-9)
  assert result["wa_difference"] == pytest.approx(wa_effect, abs=1e-9)
  for name, effect in (("ua", ua_effect), ("wa", wa_effect)):
    low, high = result[f"{name}_difference_ci95"]
    assert 0 < low < effect < high
  assert (result["only_a_correct"], result["only_b_correct"]) == (0, corrected.sum())
  assert result["wa_p_value"] == pytest.approx(
    stats.binomtest(corrected.sum(), corrected.sum()).pvalue, rel=1e-9
  )
  assert result["ua_p_value"] < 0.01
  for row in result["per_fold"]:
    mask = _FOLDS == row["fold"]
    fixed = (predictions_a != _LABELS) & (predictions_b == _LABELS) & mask
    recall_gain = [np.sum(fixed & (_LABELS == c)) / np.sum(mask & (_LABELS == c)) for c in range(4)]
    assert row["ua_difference"] == pytest.approx(100 * np.mean(recall_gain), abs=1e-9)

  mirror = compare.compare_paired(_LABELS, predictions_b, predictions_a, _FOLDS, n_resamples=2000)
  for name in ("ua", "wa"):
    assert mirror[f"{name}_difference"] == pytest.approx(-result[f"{name}_difference"], abs=1e-9)
    low, high = result[f"{name}_difference_ci95"]
    assert mirror[f"{name}_difference_ci95"] == pytest.approx([-high, -low], abs=1e-9)
    assert mirror[f"{name}_p_value"] == pytest.approx(result[f"{name}_p_value"])


def test_without_an_effect_p_values_are_uniform_and_intervals_cover_zero():
  """A and B equally good and independent, 300 times over: the UA permutation p-value is
  uniform (a 5 % test rejects about 5 % of the time) and the 95 % intervals cover the true
  difference, 0, about 95 % of the time. Seeded, so the figures are fixed."""
  rng = np.random.default_rng(1)
  ua_p, wa_p, ua_covers, wa_covers = [], [], [], []
  for seed in range(300):
    result = compare.compare_paired(
      _LABELS, _noisy(0.6, rng), _noisy(0.6, rng), _FOLDS, n_resamples=400, seed=seed
    )
    ua_p.append(result["ua_p_value"])
    wa_p.append(result["wa_p_value"])
    ua_covers.append(result["ua_difference_ci95"][0] <= 0 <= result["ua_difference_ci95"][1])
    wa_covers.append(result["wa_difference_ci95"][0] <= 0 <= result["wa_difference_ci95"][1])
  assert stats.kstest(ua_p, "uniform").pvalue > 0.01
  assert 0.02 <= np.mean(np.array(ua_p) < 0.05) <= 0.09
  assert np.mean(np.array(wa_p) < 0.05) <= 0.08  # Exact McNemar: at most about 5 %.
  assert 0.90 <= np.mean(ua_covers) <= 0.99
  assert 0.90 <= np.mean(wa_covers) <= 0.99
