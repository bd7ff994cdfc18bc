"""Killed runs resume to the same result; locks, config changes and NaN losses are refused."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import signal
import time

import jax.numpy as jnp
import pytest
from helpers import (
  REPO,
  result_metrics,
  run_module,
  session_demo_corpus,
  start_module,
  tensorboard_scalars,
  tiny_args,
)
from tensorboardX import SummaryWriter

from ser_jax import experiment, io_utils, trainer

EPOCHS = 4
# A checkpoint every epoch, so that a run killed mid-fold resumes from one.
EVERY_EPOCH = {"train.num_epochs": EPOCHS, "train.checkpoint_every_epochs": 1}


def _wait_for_checkpoint(process, workdir, fold: int, epoch: int, timeout: float = 300.0):
  """Polls until the checkpoint of (fold, epoch) is committed; fails if the run ends first."""
  path = workdir / f"fold_{fold}" / "checkpoints" / str(epoch)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      pytest.fail(f"run ended before fold {fold} epoch {epoch}: {process.stderr.read()}")
    if path.is_dir():  # Orbax renames a finished checkpoint to its step number.
      return
    time.sleep(0.05)
  pytest.fail(f"fold {fold} epoch {epoch} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, and the shared feature cache."""
  root = tmp_path_factory.mktemp("reference")
  cache = root / "cache"
  workdir = root / "run"
  process = run_module("ser_jax.main", tiny_args(workdir, cache, **EVERY_EPOCH))
  assert process.returncode == 0, process.stderr
  return cache, result_metrics(workdir)


@pytest.mark.parametrize("fold, epoch", [(0, 2), pytest.param(1, 1, marks=pytest.mark.slow)])
def test_sigkill_during_training_then_rerun_gives_the_same_results(
  tmp_path, reference, fold, epoch
):
  cache, expected = reference
  workdir = tmp_path / "run"
  args = tiny_args(workdir, cache, **EVERY_EPOCH)
  process = start_module("ser_jax.main", args)
  _wait_for_checkpoint(process, workdir, fold, epoch)
  process.send_signal(signal.SIGKILL)
  process.wait()
  if fold == 0:  # As if fold 1 had been killed after logging its first epoch, unsaved.
    with open(workdir / "metrics.jsonl", "a") as log:
      log.write(json.dumps({"fold": 1, "epoch": 1, "step": 5, "train_loss": [123.0]}) + "\n")
    stale = SummaryWriter(str(workdir / "tensorboard" / "fold_1"))
    stale.add_scalar("train_loss", 123.0, 5)
    stale.close()

  resumed = run_module("ser_jax.main", args)
  assert resumed.returncode == 0, resumed.stderr
  if fold == 1:
    assert "Fold 0 already finished" in resumed.stderr
  assert f"Fold {fold}: resuming from the checkpoint of epoch" in resumed.stderr
  assert result_metrics(workdir) == expected
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # The log has each (fold, epoch) once: records past the checkpoint were dropped.
  keys = [(r["fold"], r["epoch"]) for r in records]
  assert sorted(keys) == [(f, e) for f in (0, 1) for e in range(1, EPOCHS + 1)]
  for k in (0, 1):  # TensorBoard shows each epoch once, this run's.
    shown = tensorboard_scalars(workdir / "tensorboard" / f"fold_{k}")["train_loss"]
    assert shown == [
      (r["step"], pytest.approx(r["train_loss"][0])) for r in records if r["fold"] == k
    ]


@pytest.mark.slow  # In the default run: tests/test_store.py's kill mid-extraction and crashes.
def test_preprocess_sigkill_then_rerun_gives_identical_store(tmp_path):
  """Kills the extractor at several moments; each rerun finishes with the same bytes."""
  settings = {
    "features.max_seconds": 6.0,
    "features.kind": "logmel",
  }
  clean_cache = tmp_path / "clean"
  clean = run_module("ser_jax.preprocess", tiny_args(tmp_path / "w", clean_cache, **settings))
  assert clean.returncode == 0, clean.stderr
  clean_store = clean.stdout.splitlines()[0]

  cache = tmp_path / "killed"
  for moment in (0.5, 2.0, 3.0):
    process = start_module("ser_jax.preprocess", tiny_args(tmp_path / "w", cache, **settings))
    time.sleep(moment)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete = [p for p in cache.glob("demo-*") if (p / "meta.json").exists()]
    partial = list(cache.glob("demo-*.partial"))
    # Never a store that looks finished while a partial one exists.
    assert not (complete and partial)
  rerun = run_module("ser_jax.preprocess", tiny_args(tmp_path / "w", cache, **settings))
  assert rerun.returncode == 0, rerun.stderr
  store = rerun.stdout.splitlines()[0]
  assert pathlib.Path(store).name == pathlib.Path(clean_store).name
  for name in ("features.npy", "labels.npy", "valid_frames.npy", "manifest.csv"):
    assert (REPO / store / name).read_bytes() == (REPO / clean_store / name).read_bytes(), name
  assert not list(cache.glob("*.partial"))


@pytest.mark.slow  # Run with -m slow (docs/testing.md).
def test_second_process_on_the_same_workdir_is_refused(tmp_path, reference):
  cache, _ = reference
  args = tiny_args(tmp_path / "run", cache, **{**EVERY_EPOCH, "train.num_epochs": 50})
  first = start_module("ser_jax.main", args)
  try:
    _wait_for_checkpoint(first, tmp_path / "run", 0, 1)
    second = run_module("ser_jax.main", args)
    assert second.returncode == 2
    assert "is in use by another process" in second.stderr
    assert "Traceback" not in second.stderr
  finally:
    first.kill()
    first.wait()


def _demo_config(**overrides):
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.root = str(session_demo_corpus())
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  return config


def test_fresh_waits_for_the_lock_and_a_refused_run_leaves_no_config(tmp_path):
  """--fresh on a workdir in use is refused and deletes nothing; once free, it empties the
  workdir, and a run refused on reading its corpus writes no config.json."""
  workdir = tmp_path / "run"
  (workdir / "fold_0").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  unknown_class = _demo_config(**{"data.classes": ("neutral", "joy")})
  with io_utils.file_lock(workdir / "run.lock.0", "the first run"):
    with pytest.raises(io_utils.LockedError, match="in use by another process"):
      experiment.train_and_evaluate(unknown_class, workdir, fresh=True)
  assert (workdir / "fold_0").is_dir() and (workdir / "config.json").is_file()
  with pytest.raises(ValueError, match="joy"):
    experiment.train_and_evaluate(unknown_class, workdir, fresh=True)
  assert [path.name for path in workdir.iterdir()] == ["run.lock.0"]


def test_runs_naming_other_folds_share_the_workdir_and_no_fold_trains_twice(tmp_path):
  """While a run of fold 0 (cv.folds) holds the workdir, a run of fold 1 goes ahead, and a
  second run of fold 0, a run of every fold and --fresh are refused."""
  workdir = tmp_path / "run"
  unknown_class = {"data.classes": ("neutral", "joy")}  # Refused once past the locks.
  holder = _demo_config(**{"cv.folds": (0,)})
  with experiment._workdir_locks(holder, workdir, fresh=False):
    with pytest.raises(ValueError, match="joy"):
      experiment.train_and_evaluate(_demo_config(**unknown_class, **{"cv.folds": (1,)}), workdir)
    for folds, fresh, message in (
      ((1, 0), False, r"^fold 0 of workdir .* in use by another process \(pid \d+\); wait"),
      ((), False, r"^workdir .* is in use by another process; wait for it"),
      ((1,), True, r"^workdir .* is in use by another process; wait for it"),
    ):
      config = _demo_config(**unknown_class, **{"cv.folds": folds})
      with pytest.raises(io_utils.LockedError, match=message):
        experiment.train_and_evaluate(config, workdir, fresh=fresh)
  with pytest.raises(ValueError, match="joy"):  # Free again.
    experiment.train_and_evaluate(_demo_config(**unknown_class), workdir, fresh=True)


def test_runs_of_other_folds_at_once_in_one_workdir_add_up_to_the_whole_run(tmp_path, reference):
  """Two jobs started together, fold 0 and fold 1 of one workdir (as array jobs would be):
  both finish, and the workdir reports the uninterrupted run's results, with every epoch of
  both in metrics.jsonl and every test utterance in predictions.csv."""
  cache, expected = reference
  workdir = tmp_path / "run"
  jobs = [
    start_module(
      "ser_jax.main", tiny_args(workdir, cache, **EVERY_EPOCH, **{"cv.folds": f"({k},)"})
    )
    for k in (0, 1)
  ]
  for job in jobs:
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr
  assert result_metrics(workdir) == expected
  assert json.loads((workdir / "results.json").read_text())["n_folds"] == 2
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["fold"], r["epoch"]) for r in records]
  assert sorted(keys) == [(f, e) for f in (0, 1) for e in range(1, EPOCHS + 1)]
  with open(workdir / "predictions.csv", newline="") as f:
    folds = [row["fold"] for row in csv.DictReader(f)]
  assert sorted(set(folds)) == ["0", "1"] and len(folds) == 320


@pytest.mark.slow  # The refusal itself, in the default run: test_config.py.
def test_changed_config_is_refused_unless_fresh(tmp_path, reference):
  cache, _ = reference
  workdir = tmp_path / "run"
  one_epoch = {"train.num_epochs": 1, "cv.folds": "(0,)"}
  assert run_module("ser_jax.main", tiny_args(workdir, cache, **one_epoch)).returncode == 0
  # Result-neutral changes are accepted: test_config.py.
  changed = tiny_args(workdir, cache, **one_epoch, **{"loss.gamma": 0.5})
  refused = run_module("ser_jax.main", changed)
  assert refused.returncode == 2
  assert "different config (changed: loss.gamma)" in refused.stderr
  fresh = run_module("ser_jax.main", changed + ["--fresh"])
  assert fresh.returncode == 0, fresh.stderr
  assert json.loads((workdir / "results.json").read_text())["config"]["loss"]["gamma"] == 0.5


def test_nan_loss_stops_with_fold_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  from ser_jax import config as config_lib
  from ser_jax import experiment, train

  real_step = train.train_step

  def poisoned_step(state, batch, hparams, **options):
    state, metrics = real_step(state, batch, hparams, **options)
    metrics["loss"] = jnp.where(state.step > 10, jnp.nan, metrics["loss"])
    return state, metrics

  monkeypatch.setattr(train, "train_step", poisoned_step)
  config = config_lib.default_config()
  config.data.corpus = "demo"
  config.data.root = str(session_demo_corpus())
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.num_workers = 1
  config.features.max_seconds = 1.0
  config.model.name = "resnet10"
  config.model.width = 4
  config.model.lowering = "xla"  # Any lowering's loss is checked alike; XLA's builds fastest.
  config.train.num_epochs = 4
  config.train.checkpoint_every_epochs = 1
  config.cv.n_folds = 2
  with pytest.raises(
    trainer.NonFiniteLossError,
    match=r"fold 0, epoch 3, step 11, .*; the last good checkpoint is kept in .*fold_0/checkpoints$",
  ):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  # 160 clips train each fold: 5 steps an epoch, so step 11 is in epoch 3; epochs 1 and 2
  # were checkpointed, epoch 3 was not.
  saved = sorted(p.name for p in (tmp_path / "run" / "fold_0" / "checkpoints").iterdir())
  assert saved == ["1", "2"]
  assert not (tmp_path / "run" / "results.json").exists()


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
  target = tmp_path / "results.json"
  io_utils.atomic_write_json(target, {"good": 1})

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(io_utils.os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space"):
    io_utils.atomic_write_json(target, {"good": 2})
  assert json.loads(target.read_text()) == {"good": 1}
