"""Paired comparison of runs: statistics against closed forms and scipy, reading runs, the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
import pathlib

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from ser_jax import compare, metrics, run_results
from ser_jax.report import main

_CLASSES = ["neutral", "happiness", "sadness", "anger"]
_PROVENANCE = {
  "jax": "0.10.2",
  "jaxlib": "0.10.2",
  "flax": "0.12.0",
  "optax": "0.2.6",
  "onednn": "3.2.0",
  "backend": "cpu",
  "lowering": "onednn",
  "device": "cpu",
  "cpu_model": "AMD EPYC 7B13",
  "devices": 1,
}


def _noisy(labels: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
  """Predictions right with probability `accuracy`, otherwise a random class."""
  wrong = rng.integers(0, len(_CLASSES), len(labels))
  return np.where(rng.random(len(labels)) < accuracy, labels, wrong)


def _utterances(n_per_fold=(20, 15, 25), seed: int = 0):
  """(utt_ids, speakers, folds, labels) of a small corpus."""
  rng = np.random.default_rng(seed)
  folds = np.repeat(np.arange(len(n_per_fold)), n_per_fold)
  utt_ids = np.array([f"Ses{f}_utt{i:03d}" for i, f in enumerate(folds)])
  speakers = np.array([f"spk{f}{i % 2}" for i, f in enumerate(folds)])
  return utt_ids, speakers, folds, rng.integers(0, len(_CLASSES), len(folds))


def _write_run(
  folder: pathlib.Path,
  utterances,
  member_predictions,
  *,
  sweep=None,
  provenance=None,
  seed: int = 0,
) -> pathlib.Path:
  """A workdir with predictions.csv (rows shuffled) and its results.json (ser_jax.run_results)."""
  utt_ids, speakers, folds, labels = utterances
  member_predictions = np.atleast_2d(member_predictions)
  folder.mkdir(parents=True)
  rows = []
  for member, predictions in enumerate(member_predictions):
    for utt, speaker, fold, label, predicted in zip(
      utt_ids, speakers, folds, labels, predictions, strict=True
    ):
      probabilities = np.full(len(_CLASSES), 0.1)
      probabilities[predicted] = 0.7
      rows.append(
        [utt, speaker, fold, member, _CLASSES[label], _CLASSES[predicted], *probabilities]
      )
  np.random.default_rng(seed).shuffle(rows)
  with open(folder / "predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      ["utt_id", "speaker", "fold", "member", "label", "predicted"]
      + [f"p_{name}" for name in _CLASSES]
    )
    writer.writerows(rows)
  hyperparameters = sweep or [{"gamma": 2.0, "seed": 0, "learning_rate": 1e-3, "alpha": []}]
  members = [
    run_results.MemberResults(
      **entry,
      folds=[
        run_results.FoldResults(
          fold=int(fold),
          n_train=100,
          n_test=int((folds == fold).sum()),
          confusion_counts=metrics.confusion_counts(
            labels[folds == fold], p[folds == fold], len(_CLASSES)
          ),
        )
        for fold in np.unique(folds)
      ],
    )
    for entry, p in zip(hyperparameters, member_predictions, strict=True)
  ]
  config = {
    "data": {"corpus": "iemocap"},
    "features": {"kind": "logmel"},
    "loss": {"name": "focal", "gamma": 2.0},
    "train": {"learning_rate": 1e-3},
  }
  run_results.write(
    folder,
    run_results.RunResults(_CLASSES, members, config, provenance=provenance),
  )
  return folder


# Metrics and tests on arrays -------------------------------------------------------------------


def test_accuracies_match_scikit_learn() -> None:
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 300)
  predictions = _noisy(labels, 0.5, rng)
  assert compare.wa_of(labels, predictions) == pytest.approx(
    100 * accuracy_score(labels, predictions)
  )
  assert compare.ua_of(labels, predictions) == pytest.approx(
    100 * balanced_accuracy_score(labels, predictions)
  )
  # A class absent from the labels but predicted is skipped, as in metrics.ua.
  labels = np.where(labels == 3, 0, labels)
  counts = metrics.confusion_counts(labels, predictions, 4)
  assert compare.ua_of(labels, predictions) == pytest.approx(metrics.ua(counts))
  with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
    expected = 100 * balanced_accuracy_score(labels, predictions)
  assert compare.ua_of(labels, predictions) == pytest.approx(expected)


def _from_table(both: int, only_a: int, only_b: int, neither: int):
  """(labels, predictions_a, predictions_b) with the given 2x2 table of A and B being right."""
  right_a = np.repeat([1, 1, 0, 0], [both, only_a, only_b, neither]).astype(bool)
  right_b = np.repeat([1, 0, 1, 0], [both, only_a, only_b, neither]).astype(bool)
  labels = np.zeros(len(right_a), dtype=int)
  return labels, np.where(right_a, 0, 1), np.where(right_b, 0, 2)


@pytest.mark.parametrize("table", [(101, 121, 59, 33), (10, 1, 6, 3), (5, 0, 0, 5)])
def test_mcnemar_exact_against_binomial_closed_form(table) -> None:
  both, only_a, only_b, neither = table
  discordant = only_a + only_b
  tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2**discordant
  expected = min(1.0, 2 * tail)
  assert compare.mcnemar_exact(*_from_table(*table)) == (only_a, only_b, pytest.approx(expected))
  if table == (10, 1, 6, 3):
    assert expected == pytest.approx(2 * (1 + 7) / 2**7)


def test_identical_predictions() -> None:
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 4, 120)
  folds = np.repeat([0, 1, 2], 40)
  predictions = _noisy(labels, 0.6, rng)
  result = compare.compare_paired(labels, predictions, predictions, folds, n_resamples=300)
  for name in ("wa", "ua"):
    assert result[f"{name}_difference"] == pytest.approx(0.0, abs=1e-12)
    assert result[f"{name}_difference_ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert result[f"{name}_p_value"] == pytest.approx(1.0)
  assert result["difference"] == "B - A"


def test_clear_difference() -> None:
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, 200)
  folds = np.repeat([0, 1], 100)
  worse = _noisy(labels, 0.3, rng)
  result = compare.compare_paired(labels, worse, labels, folds, n_resamples=1000)
  for name in ("wa", "ua"):
    low, high = result[f"{name}_difference_ci95"]
    assert 0 < low <= result[f"{name}_difference"] <= high
  assert result["wa_p_value"] < 1e-12
  # No permutation reaches the observed UA gap: the smallest p that 1000 of them can give.
  assert result["ua_p_value"] == pytest.approx(2 / 1001)
  assert result["wa_b"] == pytest.approx(100.0)
  assert result["ua_b"] == pytest.approx(100.0)
  assert result["only_a_correct"] == 0


def test_ua_permutation_against_enumeration() -> None:
  """Few discordant utterances: scipy enumerates every swap; so does this test, by hand."""
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
  predictions_a = np.array([0, 1, 0, 1, 0, 2, 2, 2, 0, 3])
  predictions_b = np.array([1, 0, 0, 0, 1, 2, 2, 0, 2, 1])
  observed = compare.ua_of(labels, predictions_b) - compare.ua_of(labels, predictions_a)
  null = []
  for swap in itertools.product([False, True], repeat=len(labels)):
    swap = np.array(swap)
    a = np.where(swap, predictions_b, predictions_a)
    b = np.where(swap, predictions_a, predictions_b)
    null.append(compare.ua_of(labels, b) - compare.ua_of(labels, a))
  null = np.array(null)
  tail = min(np.mean(null >= observed - 1e-9), np.mean(null <= observed + 1e-9))
  p_value = compare.ua_permutation_p_value(labels, predictions_a, predictions_b)
  assert p_value == pytest.approx(min(1.0, 2 * tail))


def test_bootstrap_matches_scipy_with_one_fold() -> None:
  """One stratum is scipy.stats.bootstrap(paired=True): the same seed gives the same draws."""
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 4, 150)
  predictions_a, predictions_b = _noisy(labels, 0.55, rng), _noisy(labels, 0.7, rng)
  wa, ua = compare.bootstrap_differences(
    labels, predictions_a, predictions_b, np.zeros(150), n_resamples=2000, seed=7
  )

  def wa_difference(a, b, axis=-1):
    return 100 * (np.mean(b == 1, axis) - np.mean(a == 1, axis))

  def ua_difference(y, a, b, axis=-1):
    recall_a = [np.sum((y == c) & (a == c), axis) / np.sum(y == c, axis) for c in range(4)]
    recall_b = [np.sum((y == c) & (b == c), axis) / np.sum(y == c, axis) for c in range(4)]
    return 100 * (np.mean(recall_b, 0) - np.mean(recall_a, 0))

  options = {"paired": True, "n_resamples": 2000, "method": "percentile", "vectorized": True}
  hits_a, hits_b = (labels == predictions_a).astype(int), (labels == predictions_b).astype(int)
  # A comparison's interval and standard error are those of the same draws.
  result = compare.compare_paired(
    labels, predictions_a, predictions_b, np.zeros(150), n_resamples=2000, seed=7
  )
  for name, draws, data, statistic in (
    ("wa", wa, (hits_a, hits_b), wa_difference),
    ("ua", ua, (labels, predictions_a, predictions_b), ua_difference),
  ):
    expected = stats.bootstrap(data, statistic, rng=np.random.default_rng(7), **options)
    np.testing.assert_allclose(draws, expected.bootstrap_distribution)
    np.testing.assert_allclose(
      compare.percentile_interval(draws), tuple(expected.confidence_interval)
    )
    np.testing.assert_allclose(result[f"{name}_difference_ci95"], expected.confidence_interval)
    np.testing.assert_allclose(result[f"{name}_standard_error"], expected.standard_error)


def test_bootstrap_resamples_within_folds() -> None:
  folds = np.repeat([2, 0, 1], [7, 5, 9])
  indices = compare.stratified_indices(folds, 50, np.random.default_rng(0))
  assert indices.shape == (50, 21)
  for row in indices:
    np.testing.assert_array_equal(np.sort(folds[row]), np.sort(folds))
  # B wins every utterance of fold 0 and A every one of fold 1: within folds nothing varies,
  # so the WA difference is the same in every resample (an unstratified bootstrap would vary).
  labels = np.zeros(30, dtype=int)
  folds = np.repeat([0, 1], [20, 10])
  predictions_a, predictions_b = np.where(folds == 0, 1, 0), np.where(folds == 0, 0, 1)
  wa, _ = compare.bootstrap_differences(labels, predictions_a, predictions_b, folds, seed=1)
  np.testing.assert_allclose(wa, 100 * (20 - 10) / 30)


def test_bootstrap_spread_is_the_stratified_standard_error() -> None:
  """The std of the WA differences approaches sqrt(sum_f (n_f / n)^2 var_f(d) / n_f)."""
  rng = np.random.default_rng(5)
  folds = np.repeat([0, 1, 2], [60, 90, 150])
  labels = rng.integers(0, 4, len(folds))
  accuracy_b = np.array([0.9, 0.5, 0.7])[folds]
  predictions_a = _noisy(labels, 0.6, rng)
  predictions_b = np.where(rng.random(len(folds)) < accuracy_b, labels, (labels + 1) % 4)
  wa, _ = compare.bootstrap_differences(labels, predictions_a, predictions_b, folds, seed=0)
  gap = 100.0 * ((labels == predictions_b).astype(float) - (labels == predictions_a))
  n = len(folds)
  variance = sum(
    (np.sum(folds == f) / n) ** 2 * gap[folds == f].var() / np.sum(folds == f) for f in range(3)
  )
  assert wa.std() == pytest.approx(math.sqrt(variance), rel=0.05)
  result = compare.compare_paired(labels, predictions_a, predictions_b, folds, seed=0)
  assert result["wa_standard_error"] == pytest.approx(math.sqrt(variance), rel=0.05)


def test_bootstrap_is_seeded() -> None:
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 4, 90)
  folds = np.repeat([0, 1, 2], 30)
  predictions_a, predictions_b = _noisy(labels, 0.5, rng), _noisy(labels, 0.6, rng)

  def run(seed):
    return compare.compare_paired(
      labels, predictions_a, predictions_b, folds, n_resamples=500, seed=seed
    )

  first, again, other = run(3), run(3), run(4)
  assert first == again
  assert first["wa_difference_ci95"] != other["wa_difference_ci95"]
  for name in ("wa", "ua"):
    low, high = first[f"{name}_difference_ci95"]
    assert low <= first[f"{name}_difference"] <= high


def test_per_fold() -> None:
  labels = np.array([0, 1, 1, 0, 1, 2])
  folds = np.array([0, 0, 0, 1, 1, 1])
  predictions_a = np.array([0, 0, 1, 0, 1, 2])
  predictions_b = np.array([0, 1, 1, 1, 1, 2])
  rows = compare.per_fold(labels, predictions_a, predictions_b, folds)
  assert [r["fold"] for r in rows] == [0, 1]
  assert rows[0]["n_test"] == 3
  assert rows[0]["wa_a"] == pytest.approx(200 / 3)
  assert rows[0]["wa_difference"] == pytest.approx(100 / 3)
  assert rows[0]["ua_a"] == pytest.approx(75.0)  # (1 + 1/2) / 2
  assert rows[0]["ua_b"] == pytest.approx(100.0)
  assert rows[1]["wa_difference"] == pytest.approx(-100 / 3)
  assert rows[1]["ua_difference"] == pytest.approx(-100 / 3)


# Reading runs ------------------------------------------------------------------------------------


def test_load_predictions_and_consistency(tmp_path) -> None:
  utterances = _utterances()
  rng = np.random.default_rng(0)
  member_predictions = [_noisy(utterances[3], 0.6, rng), _noisy(utterances[3], 0.4, rng)]
  sweep = [{"gamma": g, "seed": 0, "learning_rate": 1e-3, "alpha": []} for g in (0.0, 2.0)]
  run = _write_run(tmp_path / "run", utterances, member_predictions, sweep=sweep)
  predictions = compare.load_predictions(run)
  assert predictions.class_names == tuple(_CLASSES)
  assert len(predictions.label) == 2 * 60
  assert predictions.probabilities.shape == (120, 4)
  compare.check_consistent(run)

  # One utterance moved to another prediction: member 0 in fold 1, member 1 in fold 2.
  summary = json.loads((run / "results.json").read_text())
  for member, fold in ((0, 1), (1, 2)):
    counts = summary["members"][member]["folds"][fold]["confusion_counts"]
    row = next(r for r in counts if r[0] > 0)
    row[0], row[1] = row[0] - 1, row[1] + 1
  (run / "results.json").write_text(json.dumps(summary))
  problems = compare.consistency_problems(run)
  assert len(problems) == 2
  assert problems[0].startswith("member 0, fold 1: confusion counts")
  assert problems[1].startswith("member 1, fold 2: confusion counts")
  with pytest.raises(compare.CompareError, match="does not follow from predictions.csv"):
    compare.check_consistent(run)


def test_load_predictions_names_bad_values(tmp_path) -> None:
  run = _write_run(tmp_path / "run", _utterances(), _utterances()[3])
  path = run / "predictions.csv"
  lines = path.read_text().splitlines()
  fields = lines[3].split(",")
  fields[4] = "boredom"
  path.write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
  with pytest.raises(compare.CompareError, match=r"predictions.csv:4: label 'boredom' is not one"):
    compare.load_predictions(run)
  with pytest.raises(compare.CompareError, match="does not exist.*rerun"):
    compare.load_predictions(tmp_path)


def test_align_refuses_different_utterances_and_classes(tmp_path) -> None:
  utt_ids, speakers, folds, labels = _utterances()
  run_a = _write_run(tmp_path / "a", (utt_ids, speakers, folds, labels), labels)
  keep = np.arange(len(labels)) >= 4
  fewer = (utt_ids[keep], speakers[keep], folds[keep], labels[keep])
  run_b = _write_run(tmp_path / "b", fewer, labels[keep])
  a, b = compare.load_predictions(run_a), compare.load_predictions(run_b)
  message = (
    r"run A has 60 test predictions, run B 56; 4 utterances are in only one run \(only in "
    r"run A: Ses0_utt000 \(fold 0\), Ses0_utt001 \(fold 0\), Ses0_utt002 \(fold 0\), ...\)"
  )
  with pytest.raises(compare.CompareError, match=message):
    compare.align(a, b)
  with pytest.raises(compare.CompareError, match="run A has no predictions for member 1"):
    compare.align(a, a, member_a=1)
  renamed = compare.Predictions(**{**vars(a), "class_names": ("neu", "hap", "sad", "ang")})
  with pytest.raises(compare.CompareError, match="run A has classes neutral, .* but run B has"):
    compare.align(a, renamed)


def test_provenance_differences() -> None:
  other = {**_PROVENANCE, "lowering": "cpu", "onednn": None, "cpu_model": "Intel Xeon"}
  del other["devices"]
  other["cuda"] = "12.4"
  assert compare.provenance_differences(_PROVENANCE, other) == {
    "onednn": ["3.2.0", None],
    "lowering": ["onednn", "cpu"],
    "cpu_model": ["AMD EPYC 7B13", "Intel Xeon"],
    "devices": [1, None],
    "cuda": [None, "12.4"],
  }
  assert compare.provenance_differences(_PROVENANCE, dict(_PROVENANCE)) == {}


# The command line -------------------------------------------------------------------------------


def _json_line(text: str) -> dict:
  return json.loads(text.strip().splitlines()[-1])


def test_cli_two_runs(tmp_path, capsys) -> None:
  utterances = _utterances()
  labels, folds = utterances[3], utterances[2]
  rng = np.random.default_rng(8)
  predictions_a, predictions_b = _noisy(labels, 0.4, rng), _noisy(labels, 0.8, rng)
  other = {**_PROVENANCE, "lowering": "cpu", "cpu_model": "Intel Xeon"}
  run_a = _write_run(tmp_path / "a", utterances, predictions_a, provenance=_PROVENANCE, seed=1)
  run_b = _write_run(tmp_path / "b", utterances, predictions_b, provenance=other, seed=2)
  assert main(["--compare", str(run_a), str(run_b), "--json", "--resamples", "400"]) == 0
  captured = capsys.readouterr()
  assert captured.err == ""
  result = _json_line(captured.out)
  # The runs' files, rows shuffled, give back the arrays they were written from: the same
  # statistics, the seeded bootstrap's included, as on the arrays themselves.
  expected = compare.compare_paired(labels, predictions_a, predictions_b, folds, n_resamples=400)
  assert {k: result[k] for k in expected} == json.loads(json.dumps(compare.json_ready(expected)))
  assert result["wa_a"] == pytest.approx(100 * accuracy_score(labels, predictions_a))
  assert result["ua_b"] == pytest.approx(100 * balanced_accuracy_score(labels, predictions_b))
  right_a, right_b = labels == predictions_a, labels == predictions_b
  assert result["only_a_correct"] == np.sum(right_a & ~right_b)
  assert result["only_b_correct"] == np.sum(right_b & ~right_a)
  assert result["n_utterances"] == 60
  assert result["run_a"] == str(run_a) and result["member_b"] == 0
  assert [f["n_test"] for f in result["per_fold"]] == [20, 15, 25]
  assert result["provenance_differences"] == {
    "lowering": ["onednn", "cpu"],
    "cpu_model": ["AMD EPYC 7B13", "Intel Xeon"],
  }
  text = captured.out
  assert text.startswith(
    f"Paired comparison (differences are B - A) over 60 test utterances in 3 folds\n"
    f"  A: {run_a} (member 0)\n  B: {run_b} (member 0)\n\n"
  )
  wa_row = next(line for line in text.splitlines() if line.startswith("| WA |"))
  low, high = result["wa_difference_ci95"]
  assert wa_row == (
    f"| WA | {result['wa_a']:.2f} | {result['wa_b']:.2f} | {result['wa_difference']:+.2f} | "
    f"[{low:+.2f}, {high:+.2f}] | {result['wa_p_value']:.3g} | exact McNemar (only A right "
    f"{result['only_a_correct']}, only B right {result['only_b_correct']}) |"
  )
  assert "| Fold | Pairs | WA A | WA B | WA B - A | UA A | UA B | UA B - A |" in text
  assert (
    "Provenance: runs differ in: lowering onednn vs cpu; cpu_model AMD EPYC 7B13 vs Intel Xeon"
    in text
  )
  # Without --json, the same text and no JSON line.
  assert main(["--compare", str(run_a), str(run_b), "--resamples", "400"]) == 0
  assert capsys.readouterr().out == text[: text.rstrip("\n").rindex("\n") + 1]


def test_cli_refuses_mismatched_runs(tmp_path, capsys) -> None:
  utt_ids, speakers, folds, labels = _utterances()
  run_a = _write_run(tmp_path / "a", (utt_ids, speakers, folds, labels), labels)
  keep = folds != 1
  run_b = _write_run(
    tmp_path / "b", (utt_ids[keep], speakers[keep], folds[keep], labels[keep]), labels[keep]
  )
  assert main(["--compare", str(run_a), str(run_b)]) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "error: run A has 60 test predictions, run B 45; 15 utterances" in captured.err


def _sweep_run(tmp_path, gammas, seeds=(0, 1), alphas=([],)):
  utterances = _utterances()
  labels = utterances[3]
  rng = np.random.default_rng(9)
  sweep = [
    {"gamma": g, "seed": s, "learning_rate": 1e-3, "alpha": a}
    for a in alphas
    for g in gammas
    for s in seeds
  ]
  member_predictions = [_noisy(labels, 0.3 + 0.1 * e["gamma"], rng) for e in sweep]
  run = _write_run(tmp_path / "sweep", utterances, member_predictions, sweep=sweep)
  return run, sweep, labels, np.array(member_predictions)


def test_cli_sweep_pools_seeds(tmp_path, capsys) -> None:
  alphas = ([], "inverse_frequency")
  run, sweep, labels, predictions = _sweep_run(tmp_path, (0.0, 2.0), alphas=alphas)
  assert main(["--compare", str(run), "--json", "--resamples", "300"]) == 0
  captured = capsys.readouterr()
  assert captured.err == ""
  result = _json_line(captured.out)
  assert result["difference"] == "B - A"
  assert [c["setting"] for c in result["comparisons"]] == [
    {"gamma": 2.0, "learning_rate": 1e-3, "alpha": None},
    {"gamma": 2.0, "learning_rate": 1e-3, "alpha": "inverse_frequency"},
  ]
  # Members: alpha none (gamma 0 seeds 0, 1; gamma 2 seeds 0, 1), then the same for alpha.
  for c, members, references in zip(
    result["comparisons"], ([2, 3], [6, 7]), ([0, 1], [4, 5]), strict=True
  ):
    assert c["members"] == members and c["reference_members"] == references
    assert c["seeds"] == [0, 1]
    assert c["n_utterances"] == 60 and c["n_paired_predictions"] == 120
    right = labels == predictions
    assert c["only_b_correct"] == sum(
      np.sum(right[m] & ~right[r]) for m, r in zip(members, references, strict=True)
    )
    assert c["only_a_correct"] == sum(
      np.sum(right[r] & ~right[m]) for m, r in zip(members, references, strict=True)
    )
    # Every seed tests the same utterances, so pooled WA and UA are the means over seeds.
    for name, metric in (("wa", compare.wa_of), ("ua", compare.ua_of)):
      assert c[f"{name}_b"] == pytest.approx(
        np.mean([metric(labels, predictions[m]) for m in members])
      )
      assert c[f"{name}_a"] == pytest.approx(
        np.mean([metric(labels, predictions[r]) for r in references])
      )
    assert [f["n_test"] for f in c["per_fold"]] == [40, 30, 50]
  assert (
    "## gamma=2, lr=0.001, alpha=inverse_frequency vs gamma=0 (seeds 0, 1; members 6, 7 vs 4, 5)"
    in captured.out
  )
  assert "120 paired predictions (60 test utterances x 2 seeds) in 3 folds" in captured.out


def test_cli_two_members_of_one_run(tmp_path, capsys) -> None:
  run, _, labels, predictions = _sweep_run(tmp_path, (0.0, 2.0))
  argv = [
    "--compare",
    str(run),
    str(run),
    "--member=1",
    "--member=3",
    "--json",
    "--resamples",
    "100",
  ]
  assert main(argv) == 0
  out = capsys.readouterr().out
  result = _json_line(out)
  assert (result["member_a"], result["member_b"]) == (1, 3)
  assert result["wa_b"] == pytest.approx(compare.wa_of(labels, predictions[3]))
  assert "Provenance: not recorded in run A and B\n" in out


def test_cli_sweep_needs_gamma_zero(tmp_path, capsys) -> None:
  run, *_ = _sweep_run(tmp_path, (1.0, 2.0))
  assert main(["--compare", str(run)]) == 1
  err = capsys.readouterr().err
  assert "error: the sweep has no gamma-0 member (gammas: 1, 2)" in err
  plain = _write_run(tmp_path / "plain", _utterances(), _utterances()[3])
  assert main(["--compare", str(plain)]) == 1
  assert "one member, not a sweep; compare a single run with another" in capsys.readouterr().err


def test_cli_arguments(tmp_path, capsys) -> None:
  for argv in (
    [],
    ["--compare", "a", "b", "c"],
    ["run", "--compare", "a", "b"],
    ["run", "--json"],
    ["--compare", "a", "--member", "1"],
  ):
    with pytest.raises(SystemExit):
      main(argv)
  capsys.readouterr()


def test_cli_sweep_against_one_reference_alpha(tmp_path, capsys) -> None:
  """--reference inverse_frequency: every setting, softmax included, against weighted CE."""
  alphas = ([], "inverse_frequency")
  run, sweep, labels, predictions = _sweep_run(tmp_path, (0.0, 2.0), alphas=alphas)
  argv = ["--compare", str(run), "--reference", "inverse_frequency", "--json"]
  assert main([*argv, "--resamples", "200"]) == 0
  captured = capsys.readouterr()
  result = _json_line(captured.out)
  settings = [(c["setting"]["gamma"], c["setting"]["alpha"]) for c in result["comparisons"]]
  assert settings == [(0.0, None), (2.0, None), (2.0, "inverse_frequency")]
  for c, members in zip(result["comparisons"], ([0, 1], [2, 3], [6, 7]), strict=True):
    assert c["members"] == members
    assert c["reference_members"] == [4, 5]  # Gamma 0 with inverse-frequency weights.
    assert c["wa_a"] == pytest.approx(
      np.mean([compare.wa_of(labels, predictions[r]) for r in (4, 5)])
    )
  assert "## gamma=0, lr=0.001, alpha=none vs gamma=0, alpha=inverse_frequency" in captured.out
