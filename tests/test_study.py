"""A study: every (corpus, setting) an ordinary run, killed and resumed, one table whose
differences follow from the runs' predictions and whose pooled estimate is statsmodels'
random-effects pool."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import signal
import time
import types

import numpy as np
import pytest
from helpers import REPO, run_module, start_module
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects
from test_study_compose import SETTINGS, write_corpora, write_manifest

from ser_jax import compare, run_results

RESAMPLES = 1000


def study_args(workdir, corpora, cache, **overrides) -> list[str]:
  """configs/focal_study.py shrunk to seconds: 4-channel ResNet, 1 s MFCCs, 2 epochs, 2 folds."""
  settings = {
    "study.corpora": repr(tuple(corpora)),
    "study.resamples": RESAMPLES,
    "model.name": "resnet10",
    "model.width": 4,
    "features.max_seconds": 1.0,
    "train.num_epochs": 2,
    "train.warmup_epochs": 0,
    "train.learning_rate": 0.01,
    "train.batch_size": 8,
    "train.checkpoint_every_epochs": 1,
    "cv.n_folds": 2,
    "data.num_workers": 1,
    "data.cache_dir": str(cache),
    "train.models_together": "none",
    "model.lowering": "xla",  # Same values; loads and traces faster than oneDNN's.
  }
  settings.update(overrides)
  return [
    f"--config={REPO / 'configs' / 'focal_study.py'}",
    f"--workdir={workdir}",
    *[f"--config.{key}={value}" for key, value in settings.items()],
    *[f"--settings={setting}" for setting in SETTINGS],
  ]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, pathlib.Path]:
  return write_corpora(tmp_path_factory.mktemp("corpora"))


def _files(folder: pathlib.Path) -> dict[str, tuple[bytes, int]]:
  return {
    str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
    for p in sorted(folder.rglob("*"))
    if p.is_file() and not p.name.startswith("run.lock")
  }


@pytest.fixture(scope="module")
def killed_study(tmp_path_factory, corpora):
  """The study killed once its first run finished and the second is half done, then rerun."""
  root = tmp_path_factory.mktemp("study")
  workdir = root / "study"
  entries = [f"{name}=csv:{path}" for name, path in corpora.items()]
  args = study_args(workdir, entries, root / "cache", **{"study.cross_corpus": True})
  log = root / "killed.log"
  process = start_module("ser_jax.study", args, output=log)
  first, second = workdir / "a" / "softmax", workdir / "a" / "focal_weighted"
  deadline = time.time() + 600
  while not (second / "fold_0" / "result.json").exists():
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      pytest.fail(f"the study ended or stalled before the kill point: {log.read_text()}")
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (second / "results.json").exists(), "killed too late: the second run finished"
  before = {"first": _files(first), "half": _files(second / "fold_0")}
  resumed = run_module("ser_jax.study", args)
  assert resumed.returncode == 0, resumed.stderr
  return types.SimpleNamespace(
    workdir=workdir,
    args=args,
    root=root,
    before=before,
    stderr=resumed.stderr,
    summary=json.loads((workdir / "results.json").read_text()),
  )


def test_a_killed_study_reads_finished_runs_and_resumes_the_half_finished(killed_study):
  workdir = killed_study.workdir
  assert "Run a/softmax already finished; reading its results" in killed_study.stderr
  assert _files(workdir / "a" / "softmax") == killed_study.before["first"]  # Not rerun.
  assert "Fold 0 already finished" in killed_study.stderr
  half = _files(workdir / "a" / "focal_weighted" / "fold_0")
  assert {k: half[k] for k in killed_study.before["half"]} == killed_study.before["half"]
  summary = killed_study.summary
  assert summary["failures"] == []
  for corpus in ("a", "b"):
    for setting in ("softmax", "focal_weighted"):
      assert summary["within"][corpus][setting]["status"] == "ok"
      compare.check_consistent(workdir / corpus / setting)  # An ordinary, complete run.
  for name in ("results.md", "forest.png", "cross_corpus.png", "config.json"):
    assert (workdir / name).is_file()


def test_corpora_are_described_as_trained(killed_study):
  corpora = killed_study.summary["corpora"]
  for name, speakers in (("a", 4), ("b", 2)):
    row = corpora[name]
    run = run_results.read(killed_study.workdir / name / "softmax")
    assert row["class_counts"] == run.class_counts["used"]
    assert row["utterances"] == run.members[0].n_test_pooled
    assert row["speakers"] == speakers and row["cv_scheme"] == "speaker" and row["n_folds"] == 2
  assert corpora["b"]["test_speakers_per_fold"] == [1, 1]  # Two speakers: leave one out.
  assert "leave one speaker out" in (killed_study.workdir / "results.md").read_text()


def _paired_from_csv(run_a: pathlib.Path, run_b: pathlib.Path):
  """(labels, predicted A, predicted B) of the utterances both runs test, read with csv."""
  rows = []
  for run in (run_a, run_b):
    with open(run / "predictions.csv", newline="") as f:
      rows.append(
        {(r["fold"], r["utt_id"]): (r["label"], r["predicted"]) for r in csv.DictReader(f)}
      )
  keys = sorted(rows[0])
  assert keys == sorted(rows[1])
  labels = np.array([rows[0][k][0] for k in keys])
  return labels, np.array([rows[0][k][1] for k in keys]), np.array([rows[1][k][1] for k in keys])


def test_table_differences_follow_from_the_runs_predictions(killed_study):
  """WA and UA differences, McNemar's p and the standard errors' use, from predictions.csv
  with numpy and scipy."""
  workdir, summary = killed_study.workdir, killed_study.summary
  pairs = [
    (f"{c}/softmax", f"{c}/focal_weighted", summary["within"][c]["focal_weighted"]) for c in "ab"
  ]
  for pair in summary["cross_corpus"]["differences"]:
    folder = f"{pair['train']}-to-{pair['test']}"
    pairs.append((f"{folder}/softmax", f"{folder}/focal_weighted", pair))
  for run_a, run_b, entry in pairs:
    labels, predicted_a, predicted_b = _paired_from_csv(workdir / run_a, workdir / run_b)
    table = entry["difference"]
    assert table["n_utterances"] == len(labels)
    hits_a, hits_b = labels == predicted_a, labels == predicted_b
    want_wa = 100 * (hits_b.mean() - hits_a.mean())
    np.testing.assert_allclose(table["wa_difference"], want_wa, atol=1e-9)
    recalls = [
      [hits[labels == name].mean() for name in np.unique(labels)] for hits in (hits_a, hits_b)
    ]
    want_ua = 100 * (np.mean(recalls[1]) - np.mean(recalls[0]))
    np.testing.assert_allclose(table["ua_difference"], want_ua, atol=1e-9)
    only_a, only_b = int(np.sum(hits_a & ~hits_b)), int(np.sum(~hits_a & hits_b))
    want_p = stats.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    np.testing.assert_allclose(table["wa_p_value"], want_p, rtol=1e-12)
    for metric in ("wa", "ua"):
      low, high = table[f"{metric}_difference_ci95"]
      assert low - 1e-9 <= table[f"{metric}_difference"] <= high + 1e-9, (run_a, metric)
    assert 0 < table["ua_p_value"] <= 1


def test_pooled_estimate_is_statsmodels_random_effects(killed_study):
  summary = killed_study.summary
  for metric in ("ua", "wa"):
    rows = [summary["within"][c]["focal_weighted"]["difference"] for c in "ab"]
    effects = np.array([r[f"{metric}_difference"] for r in rows])
    variances = np.array([r[f"{metric}_standard_error"] ** 2 for r in rows])
    assert np.all(variances > 0), "the tiny runs must differ for a pool to exist"
    pooled = summary["pooled"]["focal_weighted"][metric]
    # Two corpora: statsmodels' Paule-Mandel iteration converges (the estimating equation
    # is convex in tau^2), and with q >= 1 or floored to 1 the HKSJ interval is its
    # random-effects interval on t quantiles.
    reference = combine_effects(effects, variances, method_re="iterated", atol=1e-12)
    assert pooled["k"] == 2
    np.testing.assert_allclose(pooled["tau2"], reference.tau2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pooled["estimate"], reference.mean_effect_re, rtol=1e-9)
    np.testing.assert_allclose(pooled["ci95"], reference.conf_int(use_t=True)[1], rtol=1e-6)
    np.testing.assert_allclose(pooled["q"], reference.q, rtol=1e-9)
    np.testing.assert_allclose(pooled["i2"], 100 * max(0.0, reference.i2), atol=1e-9)
    np.testing.assert_allclose(pooled["common_effect_ci95"], reference.conf_int()[0], rtol=1e-9)


def test_cross_corpus_matrix_has_cross_validation_on_its_diagonal(killed_study):
  workdir, summary = killed_study.workdir, killed_study.summary
  for setting in ("softmax", "focal_weighted"):
    matrix = summary["cross_corpus"]["ua"][setting]
    assert matrix["corpora"] == ["a", "b"]
    ua = np.array(matrix["ua"], dtype=float)
    assert ua.shape == (2, 2)
    for k, corpus in enumerate("ab"):
      assert ua[k, k] == summary["within"][corpus][setting]["ua_fold_mean"]
    for train, test, (row, col) in (("a", "b", (0, 1)), ("b", "a", (1, 0))):
      run = run_results.read(workdir / f"{train}-to-{test}" / setting)
      (fold,) = run.members[0].folds
      assert ua[row, col] == run.members[0].ua_fold_mean
      assert run.config["data"]["test_corpus"] == "csv"
      assert fold.n_train == sum(run.class_counts["used"].values())
      assert fold.n_test == sum(run.class_counts["test"].values())
      tested = summary["corpora"][test]["class_counts"]
      assert fold.n_test >= sum(tested.values())  # Every utterance, not a subset.


def test_predict_applies_a_cross_corpus_run(killed_study, corpora):
  run = killed_study.workdir / "a-to-b" / "softmax"
  with open(run / "predictions.csv", newline="") as f:
    row = next(csv.DictReader(f))
  with open(corpora["b"], newline="") as f:
    path = next(r["path"] for r in csv.DictReader(f) if r["utt_id"] == row["utt_id"])
  done = run_module(
    "ser_jax.predict", [f"--workdir={run}", "--windows", str(corpora["b"].parent / path)]
  )
  assert done.returncode == 0, done.stderr
  first_window = json.loads(done.stdout)["windows"][0]["probabilities"]  # The clip as stored.
  for name, p in first_window.items():
    assert p == pytest.approx(float(row[f"p_{name}"]), abs=1e-5)


def test_a_corpus_that_cannot_be_read_fails_alone(killed_study, corpora, tmp_path):
  workdir = tmp_path / "study"
  shutil.copytree(killed_study.workdir, workdir)
  no_happiness = write_manifest(corpora["a"], tmp_path / "a.csv", without_label="happiness")
  entries = [
    f"a=csv:{corpora['a']}",
    f"gone=csv:{tmp_path / 'gone.csv'}",
    f"nohap=csv:{no_happiness}",
  ]
  args = study_args(workdir, entries, killed_study.root / "cache", **{"study.cross_corpus": True})
  done = run_module("ser_jax.study", args)
  assert done.returncode == 1, done.stderr
  failed = [line for line in done.stderr.splitlines() if "ERROR Corpus" in line]
  assert len(failed) == 2 and "gone" in failed[0] and "nohap" in failed[1]
  assert "does not exist" in failed[0] and "unknown class 'happiness'" in failed[1]
  assert "Run a/softmax already finished" in done.stderr  # a goes on, read not rerun.
  summary = json.loads((workdir / "results.json").read_text())
  assert [summary["corpora"][n]["status"] for n in ("a", "gone", "nohap")] == [
    "ok",
    "failed",
    "failed",
  ]
  assert summary["cross_corpus"]["ua"]["softmax"]["corpora"] == ["a"]
  assert "not_pooled" in summary["pooled"]["focal_weighted"]["ua"]
  table = (workdir / "results.md").read_text()
  assert "| gone | csv | | | | | failed: data.root" in table
  assert not (workdir / "gone").exists()


def test_a_config_change_that_would_mix_results_is_refused(killed_study):
  workdir = killed_study.workdir
  before = (workdir / "config.json").read_text()
  done = run_module("ser_jax.study", [*killed_study.args, "--config.train.num_epochs=3"])
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: study workdir")
  assert "changed: train.num_epochs" in done.stderr
  assert (workdir / "config.json").read_text() == before


def test_one_discordant_utterance_has_permutation_p_one():
  labels = np.array([0, 1, 0, 1])
  a, b = np.array([0, 1, 0, 0]), np.array([0, 1, 0, 1])
  assert compare.ua_permutation_p_value(labels, a, b, n_resamples=100) == 1.0
