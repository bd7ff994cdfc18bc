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
  cache = tmp_path / "cache"
  sweep = run_module(
    "ser_jax.main", _sweep_args(tmp_path / "sweep", cache, **{"sweep.members_per_chunk": 1})
  )
  assert sweep.returncode == 0, sweep.stderr
  assert (tmp_path / "sweep" / "fold_0" / "members_1-1" / "checkpoints" / "2").is_dir()
  summary = json.loads((tmp_path / "sweep" / "results.json").read_text())
  singles = {}  # The separate runs, at once: the sweep has built their feature store.
  for gamma in (0.0, 2.0):
    single = tmp_path / f"gamma_{gamma}"
    args = tiny_args(
      single, cache, **{"loss.gamma": gamma, "train.num_epochs": 2, "sweep.gammas": "()"}
    )
    args = [a.replace("configs/demo.py", "configs/gamma_sweep.py:demo") for a in args]
    singles[gamma] = (single, start_module("ser_jax.main", args))
  for k, (gamma, (single, process)) in enumerate(singles.items()):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    expected = result_metrics(single)
    member = summary["sweep"][k]
    assert member["gamma"] == gamma
    assert member["overall_accuracy"] == expected["overall_accuracy"]
    assert member["class_accuracy"] == expected["class_accuracy"]
    # ser_jax.predict finds each member in its chunk's checkpoints.
    waveform = np.sin(2 * np.pi * 220.0 * np.arange(16000) / 16000).astype(np.float32)
    from_sweep = Predictor.from_workdir(tmp_path / "sweep", member=k).predict(waveform, 16000)
    from_single = Predictor.from_workdir(single).predict(waveform, 16000)
    np.testing.assert_allclose(list(from_sweep.values()), list(from_single.values()), rtol=1e-5)
  with pytest.raises(PredictorError, match=r"member=2 is out of range; the run has 2 member"):
    Predictor.from_workdir(tmp_path / "sweep", member=2)


def test_vmapped_sweep_writes_every_member_and_the_curve(tmp_path):
  workdir = tmp_path / "sweep"
  process = run_module("ser_jax.main", _sweep_args(workdir, tmp_path / "cache"))
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
