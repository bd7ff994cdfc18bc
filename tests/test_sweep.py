"""Gamma sweeps: members trained together equal separate runs; results list every member."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import result_metrics, run_module, start_module, tiny_args

from ser_jax.predict import Predictor, PredictorError

SWEEP = {"sweep.gammas": "(0.0,2.0)", "sweep.seeds": "(0,)", "train.num_epochs": 2}


def _sweep_args(workdir, cache, **overrides):
  args = tiny_args(workdir, cache, **{**SWEEP, **overrides})
  return [a.replace("configs/demo.py", "configs/gamma_sweep.py:demo") for a in args]


def test_chunked_sweep_members_equal_separate_runs(tmp_path):
  """Members 0-1 train as one vmapped program, member 2 alone; each equals its own run."""
  cache = tmp_path / "cache"
  gammas = (0.0, 2.0, 5.0)
  sweep = run_module(
    "ser_jax.main",
    _sweep_args(
      tmp_path / "sweep", cache, **{"sweep.gammas": str(gammas), "sweep.members_per_chunk": 2}
    ),
  )
  assert sweep.returncode == 0, sweep.stderr
  assert (tmp_path / "sweep" / "fold_0" / "members_0-1" / "checkpoints" / "2").is_dir()
  assert (tmp_path / "sweep" / "fold_0" / "members_2-2" / "checkpoints" / "2").is_dir()
  summary = json.loads((tmp_path / "sweep" / "results.json").read_text())
  singles = {}  # The separate runs; the sweep has built their feature store.
  for gamma in gammas:
    single = tmp_path / f"gamma_{gamma}"
    args = tiny_args(
      single, cache, **{"loss.gamma": gamma, "train.num_epochs": 2, "sweep.gammas": "()"}
    )
    args = [a.replace("configs/demo.py", "configs/gamma_sweep.py:demo") for a in args]
    singles[gamma] = (single, start_module("ser_jax.main", args))
    if len(singles) == 1:  # The others then load its compiled programs from the cache.
      singles[gamma][1].wait(timeout=600)
  waveform = np.sin(2 * np.pi * 220.0 * np.arange(16000) / 16000).astype(np.float32)
  for k, (gamma, (single, process)) in enumerate(singles.items()):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    expected = result_metrics(single)
    member = summary["sweep"][k]
    assert member["gamma"] == gamma
    # A vmapped program sums in another order than a plain one: the same predictions up to
    # an example whose top two classes are within rounding.
    assert abs(member["overall_accuracy"] - expected["overall_accuracy"]) <= 100 / 160
    # ser_jax.predict finds each member in its chunk's checkpoints.
    from_sweep = Predictor.from_workdir(tmp_path / "sweep", member=k).predict(waveform, 16000)
    from_single = Predictor.from_workdir(single).predict(waveform, 16000)
    np.testing.assert_allclose(list(from_sweep.values()), list(from_single.values()), rtol=1e-3)
  with pytest.raises(PredictorError, match=r"member=3 is out of range; the run has 3 member"):
    Predictor.from_workdir(tmp_path / "sweep", member=3)


def test_vmapped_sweep_writes_every_member_and_the_curve(tmp_path):
  workdir = tmp_path / "sweep"
  args = _sweep_args(workdir, tmp_path / "cache", **{"sweep.members_per_chunk": 2})
  process = run_module("ser_jax.main", args)
  assert process.returncode == 0, process.stderr
  summary = json.loads((workdir / "results.json").read_text())
  assert [(m["gamma"], m["seed"]) for m in summary["sweep"]] == [(0.0, 0), (2.0, 0)]
  for member in summary["sweep"]:
    assert 0.0 <= member["class_accuracy"] <= 100.0
    assert member["class_accuracy_std"] >= 0.0
  fold_result = json.loads((workdir / "fold_0" / "result.json").read_text())
  assert len(fold_result["confusion_counts"]) == 2  # One confusion matrix per member.
  assert "| gamma | seed | learning rate | WA | UA |" in (workdir / "results.md").read_text()
  assert (workdir / "sweep.png").stat().st_size > 0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(len(r["train_loss"]) == 2 for r in records)


def test_class_weights_sweep_in_chunks_that_fit_and_every_prediction_kept(tmp_path):
  """sweep.alphas joins the swept arrays; with members_per_chunk=0 the run sizes its chunks
  (one member at a time on CPUs) and says so; predictions.csv holds every member."""
  from ser_jax import compare

  workdir = tmp_path / "sweep"
  alphas = "((1.0,1.0,1.0,1.0),'inverse_frequency')"
  args = _sweep_args(
    workdir, tmp_path / "cache", **{"sweep.gammas": "(0.0,)", "sweep.alphas": alphas}
  )
  process = run_module("ser_jax.main", args)
  assert process.returncode == 0, process.stderr
  assert "2 members: 2 chunks of 1" in process.stderr
  summary = json.loads((workdir / "results.json").read_text())
  assert [m["alpha"] for m in summary["sweep"]] == [[1.0, 1.0, 1.0, 1.0], "inverse_frequency"]
  predictions = compare.load_predictions(workdir)
  assert sorted(set(predictions.member.tolist())) == [0, 1]
  assert len(predictions.member) == 2 * sum(f["n_test"] for f in summary["folds"])
  compare.check_consistent(workdir)  # results.json's counts follow from predictions.csv.
  waveform = np.sin(2 * np.pi * 220.0 * np.arange(16000) / 16000).astype(np.float32)
  assert Predictor.from_workdir(workdir, member=1).predict(waveform, 16000)


def test_a_member_that_cannot_fit_stops_before_training(tmp_path, monkeypatch):
  from ser_jax import experiment, memory
  from ser_jax.config import default_config

  config = default_config()
  config.data.corpus = "demo"
  config.data.cache_dir = str(tmp_path / "cache")
  config.model.width = 4
  config.features.max_seconds = 1.0
  config.cv.n_folds = 2
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 20)
  with pytest.raises(memory.MemoryPlanError) as error:
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "\n" not in message and "available" in message and "batch_size" in message
  assert not (tmp_path / "run" / "fold_0").exists()
