"""End to end: `python -m ser_jax.main` on the demo corpus, as a user runs it."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import (
  REPO,
  result_metrics,
  run_code,
  run_module,
  session_demo_corpus,
  tensorboard_scalars,
  tiny_args,
)

from ser_jax import results, run_results
from ser_jax.data import corpora

RESULT_KEYS = {
  "schema_version",
  "class_names",
  "members",
  "num_params",
  "feature_store",
  "skipped_files",
  "class_counts",
  "provenance",
  "config",
  "wall_seconds",
  "n_folds",
}
MEMBER_KEYS = {
  "gamma",
  "seed",
  "learning_rate",
  "alpha",
  *(
    f"{s}_{over}" for s in ("wa", "ua", "macro_f1") for over in ("fold_mean", "fold_std", "pooled")
  ),
  "n_test_pooled",
  "per_class_recall_pooled",
  "confusion_counts_pooled",
  "confusion_matrix_pooled",
  "folds",
}
FOLD_KEYS = {"fold", "n_train", "n_test", "wa", "ua", "macro_f1", "confusion_counts"}


# The demo reader's default classes: data.classes left empty.
EVERY_CLASS = {"data.classes": "()"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("main")
  workdir, cache = root / "run", root / "cache"
  process = run_module("ser_jax.main", tiny_args(workdir, cache, **EVERY_CLASS))
  assert process.returncode == 0, process.stderr
  return workdir, cache, process


def test_results_json_has_the_documented_keys(finished_run):
  workdir, _, _ = finished_run
  summary = json.loads((workdir / "results.json").read_text())
  assert set(summary) == RESULT_KEYS and summary["schema_version"] == 2
  assert summary["n_folds"] == 2
  assert summary["class_names"] == ["neutral", "happiness", "sadness", "anger"]
  (model,) = summary["members"]
  assert set(model) == MEMBER_KEYS
  assert [f["fold"] for f in model["folds"]] == [0, 1]
  # Every demo utterance is tested exactly once over the folds.
  assert sum(f["n_test"] for f in model["folds"]) == 320 == model["n_test_pooled"]
  assert np.sum(model["confusion_counts_pooled"]) == 320
  rows = np.array(model["confusion_matrix_pooled"])
  np.testing.assert_allclose(rows.sum(axis=1), 100.0)
  for fold in model["folds"]:
    assert set(fold) == FOLD_KEYS
    counts = np.array(fold["confusion_counts"])
    assert counts.sum() == fold["n_test"]
    assert fold["wa"] == pytest.approx(100 * np.trace(counts) / counts.sum())
  wa = [f["wa"] for f in model["folds"]]
  assert model["wa_fold_mean"] == pytest.approx(np.mean(wa))
  assert model["wa_fold_std"] == pytest.approx(np.std(wa))
  assert run_results.read(workdir).members[0].wa_fold_mean == model["wa_fold_mean"]


def test_workdir_holds_checkpoints_metrics_and_tables(finished_run):
  workdir, _, _ = finished_run
  for fold in (0, 1):
    steps = sorted(int(p.name) for p in (workdir / f"fold_{fold}" / "checkpoints").iterdir())
    assert steps[-1] == 3  # The final epoch is always saved.
    assert (workdir / f"fold_{fold}" / "normalisation.npz").exists()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["fold"], r["epoch"]) for r in records] == [(f, e) for f in (0, 1) for e in (1, 2, 3)]
  table = (workdir / "results.md").read_text()
  assert "| MFCC | Focal (gamma=2) |" in table
  assert "| true \\ predicted | neutral | happiness | sadness | anger |" in table
  for fold in (0, 1):
    scalars = tensorboard_scalars(workdir / "tensorboard" / f"fold_{fold}")
    for name in ("train_loss", "train_accuracy", "learning_rate"):
      want = [(r["step"], r[name][0]) for r in records if r["fold"] == fold]
      got = scalars[name]
      assert [step for step, _ in got] == [step for step, _ in want]
      np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


def test_rerun_keeps_finished_folds(finished_run):
  workdir, cache, _ = finished_run
  before = result_metrics(workdir)
  wall_seconds = run_results.read(workdir).wall_seconds
  process = run_module("ser_jax.main", tiny_args(workdir, cache, **EVERY_CLASS))
  assert process.returncode == 0, process.stderr
  assert "Fold 0 already finished" in process.stderr
  assert "Fold 1 already finished" in process.stderr
  assert result_metrics(workdir) == before
  assert run_results.read(workdir).wall_seconds == wall_seconds  # It trained nothing.


def test_empty_classes_mean_every_class_of_the_corpus(finished_run):
  """--config.data.classes='()' trains on every class of the demo corpus, in its order."""
  workdir, _, _ = finished_run
  results = run_results.read(workdir)
  defaults = tuple(corpora.CORPORA["demo"].classes)
  assert results.config["data"]["classes"] == []
  assert results.class_names == defaults
  counts = results.members[0].confusion_counts_pooled
  assert counts.shape == (len(defaults), len(defaults))
  assert counts.sum() == sum(f.n_test for f in results.members[0].folds) == 320
  header = (workdir / "predictions.csv").read_text().splitlines()[0].split(",")
  assert header[-len(defaults) :] == [f"p_{name}" for name in defaults]


@pytest.mark.slow  # Run with -m slow (docs/testing.md).
def test_compiled_programs_are_kept_under_the_cache_folder(tmp_path):
  # XLA's lowering: the fresh cache folder would otherwise first compile the oneDNN library.
  overrides = {"cv.folds": "(0,)", "train.num_epochs": 1, "model.lowering": "cpu"}
  args = tiny_args(tmp_path / "run", tmp_path / "features", **overrides)
  env = {"JAX_COMPILATION_CACHE_DIR": None, "SER_JAX_CACHE": str(tmp_path / "cache")}
  process = run_module("ser_jax.main", args, env=env)
  assert process.returncode == 0, process.stderr
  assert f"Compiled programs are cached in {tmp_path / 'cache' / 'xla'}" in process.stderr
  assert any(p.name.startswith("jit_") for p in (tmp_path / "cache" / "xla").iterdir())


@pytest.mark.parametrize("setting", ["", "elsewhere"])
def test_a_compilation_cache_setting_wins(tmp_path, setting):
  """JAX_COMPILATION_CACHE_DIR keeps its value; empty means no cache."""
  code = (
    "import jax; from ser_jax import cli; cli.use_compilation_cache(); "
    "print(repr(jax.config.jax_compilation_cache_dir))"
  )
  process = run_code(
    code, env={"JAX_COMPILATION_CACHE_DIR": setting, "SER_JAX_CACHE": str(tmp_path)}
  )
  assert process.returncode == 0, process.stderr
  assert process.stdout.strip() == repr(setting)
  assert not (tmp_path / "xla").exists()


def test_preprocess_prints_store_and_class_counts(finished_run):
  workdir, cache, _ = finished_run
  process = run_module("ser_jax.preprocess", tiny_args(workdir, cache))
  assert process.returncode == 0, process.stderr
  lines = process.stdout.splitlines()
  assert lines[0] == run_results.read(workdir).feature_store
  counts = dict(line.split("\t")[:2] for line in lines[1:5])
  assert counts == {"neutral": "154", "happiness": "38", "sadness": "86", "anger": "42"}


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.train.num_epoch=3", "unknown config key 'train.num_epoch'"),
    ("--config.train.batch_size=0", "train.batch_size=0"),
    ("--config.data.corpus=iemocapp", "data.corpus='iemocapp'"),
    ("--config.data.classes=('neutral','joy')", "joy"),
    ("--config.cv.n_folds=50", "more than class 'happiness' has examples"),
  ],
)
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  args = tiny_args(tmp_path / "run", tmp_path / "cache") + [override]
  process = run_module("ser_jax.main", args)
  assert process.returncode != 0
  assert message in process.stderr
  assert "Traceback" not in process.stderr
  assert not (tmp_path / "run" / "results.json").exists()
  assert not (tmp_path / "run" / "config.json").exists()  # Its corrected rerun is not refused.


@pytest.mark.parametrize(
  "config_flag, more_flags, message",
  [
    ("{config}:x", ["--workdir={run}"], "parsing config file: TypeError: get_config() takes 0"),
    (
      "{config}",
      ["--workdir={run}", "--config.train.num_epochs=abc"],
      "flag --config.train.num_epochs=abc: invalid literal for int() with base 10: 'abc'",
    ),
    ("{config}", [], "flag --workdir=None: Flag --workdir must have a value other than None."),
  ],
)
def test_a_bad_flag_is_one_line_with_exit_status_2(tmp_path, config_flag, more_flags, message):
  """absl's own parser says "FATAL Flags parsing error" with status 1, and puts the
  traceback of a config file's get_config() in it."""
  names = {"config": REPO / "configs" / "demo.py", "run": tmp_path / "run"}
  args = [f"--config={config_flag}", *more_flags]
  process = run_module("ser_jax.main", [arg.format(**names) for arg in args])
  assert process.returncode == 2
  (line,) = process.stderr.strip().splitlines()
  assert line.startswith("error: flag --") and message in line
  assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_one_line_with_exit_status_2(tmp_path):
  workdir = tmp_path / "results.txt"
  workdir.write_text("not a folder\n")
  process = run_module("ser_jax.main", ["--config=configs/demo.py", f"--workdir={workdir}"])
  assert process.returncode == 2
  assert process.stderr.strip().splitlines()[-1] == f"error: [Errno 17] File exists: '{workdir}'"
  assert "Traceback" not in process.stderr


def test_broken_files_among_good_ones_are_skipped_and_listed(finished_run, tmp_path):
  """A user's csv corpus: the demo's clips plus files that cannot be audio."""
  _, cache, _ = finished_run
  demo_root = session_demo_corpus()
  rows = (demo_root / "manifest.csv").read_text().splitlines()[1:]
  broken = {"empty.wav": b"", "text.wav": b"not audio at all", "truncated.wav": b"RIFF\x00\x00"}
  for name, data in broken.items():
    (tmp_path / name).write_bytes(data)
  lines = ["path,label,speaker"]
  lines += [f"{demo_root / r.split(',')[1]},{r.split(',')[2]},{r.split(',')[3]}" for r in rows]
  lines += [f"{name},anger,spk_x" for name in broken]
  (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
  csv_args = [
    "--config.data.corpus=csv",
    f"--config.data.root={tmp_path / 'manifest.csv'}",
    "--config.data.classes=('neutral','happiness','sadness','anger')",
  ]
  workdir = tmp_path / "run"
  process = run_module(
    "ser_jax.main", tiny_args(workdir, cache, **{"train.num_epochs": 1}) + csv_args
  )
  assert process.returncode == 0, process.stderr
  results = run_results.read(workdir)
  skipped = {pathlib.Path(s["path"]).name: s["reason"] for s in results.skipped_files}
  assert set(skipped) == set(broken)
  assert "empty" in skipped["empty.wav"]
  assert results.members[0].n_test_pooled == 320
  assert "3 files skipped" in process.stderr

  strict = run_module(
    "ser_jax.main",
    tiny_args(tmp_path / "strict", cache, **{"train.num_epochs": 1, "data.strict": True})
    + csv_args,
  )
  assert strict.returncode == 2
  assert "error:" in strict.stderr and ".wav" in strict.stderr


def test_an_epochs_scalars_are_on_disk_when_scalars_returns(tmp_path):
  """Before the epoch's checkpoint is saved: a kill after it must not lose the epoch."""
  board = results.TensorBoard(tmp_path / "fold_0", purge_step=6)
  record = {"step": 10, "train_loss": [0.5], "train_accuracy": [0.75], "learning_rate": [1e-3]}
  board.scalars(record, [None])
  on_disk = tensorboard_scalars(tmp_path / "fold_0")  # Read while the writer is still open.
  assert on_disk == {
    "train_loss": [(10, 0.5)],
    "train_accuracy": [(10, 0.75)],
    "learning_rate": [(10, pytest.approx(1e-3))],
  }
  board.close()
