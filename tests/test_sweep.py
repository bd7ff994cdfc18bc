"""Gamma sweeps: members trained together equal separate runs; results list every member."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import run_module, session_demo_corpus, start_module, tensorboard_scalars, tiny_args

from ser_jax import compare, run_results
from ser_jax.predict import Predictor, PredictorError

# Fold 0 of 2 for 2 epochs at width 4: each run trains for seconds.
SWEEP = {
  "sweep.gammas": "(0.0,2.0)",
  "sweep.seeds": "(0,)",
  "train.num_epochs": 2,
  "cv.folds": "(0,)",
}
GAMMAS = (0.0, 2.0, 5.0)
PROBABILITY_TOLERANCE = 1e-5  # Measured: 6e-8 after two epochs.


def _sweep_args(workdir, cache, **overrides):
  args = tiny_args(workdir, cache, **{**SWEEP, **overrides})
  return [a.replace("configs/demo.py", "configs/gamma_sweep.py:demo") for a in args]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One feature store for every run of this file."""
  return tmp_path_factory.mktemp("sweep_cache")


def _train_singles(root: pathlib.Path, cache, gammas) -> dict[float, pathlib.Path]:
  """{gamma: workdir} of one-member runs, seed 0, with the sweeps' other settings."""
  runs = {}
  for gamma in gammas:
    args = _sweep_args(
      root / f"gamma_{gamma}", cache, **{"loss.gamma": gamma, "sweep.gammas": "()"}
    )
    runs[gamma] = start_module("ser_jax.main", args)
    if len(runs) == 1:  # It builds the store; the others then load its compiled programs.
      runs[gamma].wait(timeout=600)
  for process in runs.values():
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
  return {gamma: root / f"gamma_{gamma}" for gamma in gammas}


@pytest.fixture(scope="module")
def singles(tmp_path_factory, cache) -> dict[float, pathlib.Path]:
  """The one-member runs of the two-member sweep's gammas (SWEEP)."""
  return _train_singles(tmp_path_factory.mktemp("singles"), cache, GAMMAS[:2])


def _assert_member_equals_single(sweep, member: int, single) -> None:
  """Sweep member `member` has the single run's test predictions: the same probabilities up
  to float32 rounding (a vmapped program sums in another order than a plain one) and so the
  same predicted classes and confusion counts, but for an utterance whose top two classes
  are within that rounding of each other."""
  ours, theirs = compare.load_predictions(sweep), compare.load_predictions(single)
  rows = ours.member == member
  assert sorted(zip(ours.fold[rows], ours.utt_id[rows], strict=True)) == sorted(
    zip(theirs.fold, theirs.utt_id, strict=True)
  )
  order_ours = np.lexsort((ours.utt_id[rows], ours.fold[rows]))
  order_theirs = np.lexsort((theirs.utt_id, theirs.fold))
  probabilities = ours.probabilities[rows][order_ours]
  want = theirs.probabilities[order_theirs]
  np.testing.assert_allclose(probabilities, want, rtol=0, atol=PROBABILITY_TOLERANCE)
  top_two = np.sort(want, axis=1)[:, -2:]
  clear = top_two[:, 1] - top_two[:, 0] > 2 * PROBABILITY_TOLERANCE
  predicted, want_predicted = ours.predicted[rows][order_ours], theirs.predicted[order_theirs]
  np.testing.assert_array_equal(predicted[clear], want_predicted[clear])
  counts = json.loads((sweep / "fold_0" / "result.json").read_text())["confusion_counts"]
  want_counts = json.loads((single / "fold_0" / "result.json").read_text())["confusion_counts"]
  if clear.all():
    assert counts[member] == want_counts[0]


@pytest.mark.slow  # Stacked models equal lone ones in the default run: test_engine.py.
def test_chunked_sweep_members_equal_separate_runs(tmp_path, cache, singles):
  """Members 0-1 train as one vmapped program, member 2 alone; each equals its own run."""
  singles = {**singles, **_train_singles(tmp_path / "singles", cache, GAMMAS[2:])}
  sweep = run_module(
    "ser_jax.main",
    _sweep_args(
      tmp_path / "sweep",
      cache,
      **{
        "sweep.gammas": str(GAMMAS),
        "train.models_together": "vmap",
        "train.models_per_program": 2,
      },
    ),
  )
  assert sweep.returncode == 0, sweep.stderr
  assert (tmp_path / "sweep" / "fold_0" / "members_0-1" / "checkpoints" / "2").is_dir()
  assert (tmp_path / "sweep" / "fold_0" / "members_2-2" / "checkpoints" / "2").is_dir()
  members = run_results.read(tmp_path / "sweep").members
  waveform = np.sin(2 * np.pi * 220.0 * np.arange(16000) / 16000).astype(np.float32)
  for k, gamma in enumerate(GAMMAS):
    assert members[k].gamma == gamma
    _assert_member_equals_single(tmp_path / "sweep", k, singles[gamma])
    # ser_jax.predict finds each member in its chunk's checkpoints.
    from_sweep = Predictor.from_workdir(tmp_path / "sweep", member=k).predict(waveform, 16000)
    from_single = Predictor.from_workdir(singles[gamma]).predict(waveform, 16000)
    np.testing.assert_allclose(list(from_sweep.values()), list(from_single.values()), rtol=1e-3)
  with pytest.raises(PredictorError, match=r"member=3 is out of range; the run has 3 member"):
    Predictor.from_workdir(tmp_path / "sweep", member=3)


def test_vmapped_sweep_writes_every_member_and_the_curve(tmp_path, cache, singles):
  workdir = tmp_path / "sweep"
  args = _sweep_args(workdir, cache, **{"train.models_together": "vmap"})
  process = run_module("ser_jax.main", args)
  assert process.returncode == 0, process.stderr
  members = run_results.read(workdir).members
  assert [(m.gamma, m.seed) for m in members] == [(0.0, 0), (2.0, 0)]
  # Each member is its gamma's one-member run (seed 0), trained in one vmapped program.
  for k, gamma in enumerate((0.0, 2.0)):
    _assert_member_equals_single(workdir, k, singles[gamma])
  fold_result = json.loads((workdir / "fold_0" / "result.json").read_text())
  assert len(fold_result["confusion_counts"]) == 2  # One confusion matrix per member.
  text = (workdir / "results.md").read_text()
  assert "| gamma | seed | learning rate | class weights | WA | UA |" in text
  # The headline gives member 0's scores, labelled with its gamma (0), not loss.gamma.
  assert "Softmax (member 0 of 2: every member below)" in text.splitlines()[0]
  assert (workdir / "sweep.png").stat().st_size > 0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(len(r["train_loss"]) == 2 for r in records)
  scalars = tensorboard_scalars(workdir / "tensorboard" / "fold_0")
  for k, member in enumerate(members):  # A tag of its own, naming it.
    tag = f"train_loss/member_{k}_gamma_{member.gamma:g}_seed_0_lr_{member.learning_rate:g}"
    np.testing.assert_allclose(
      [value for _, value in scalars[tag]], [r["train_loss"][k] for r in records], rtol=1e-6
    )


def test_class_weights_sweep_in_chunks_that_fit_and_every_prediction_kept(tmp_path, cache):
  """sweep.alphas joins the swept arrays; with train.models_per_program=0 the run sizes its programs
  (one member at a time on CPUs) and says so; predictions.csv holds every member."""
  workdir = tmp_path / "sweep"
  alphas = "((1.0,1.0,1.0,1.0),'inverse_frequency')"
  args = _sweep_args(workdir, cache, **{"sweep.gammas": "(0.0,)", "sweep.alphas": alphas})
  process = run_module("ser_jax.main", args)
  assert process.returncode == 0, process.stderr
  assert "2 models: 2 chunks of 1" in process.stderr
  members = run_results.read(workdir).members
  assert [m.alpha for m in members] == [(1.0, 1.0, 1.0, 1.0), "inverse_frequency"]
  predictions = compare.load_predictions(workdir)
  assert sorted(set(predictions.member.tolist())) == [0, 1]
  assert len(predictions.member) == sum(m.n_test_pooled for m in members) == 2 * 160
  compare.check_consistent(workdir)  # results.json's counts follow from predictions.csv.
  waveform = np.sin(2 * np.pi * 220.0 * np.arange(16000) / 16000).astype(np.float32)
  assert Predictor.from_workdir(workdir, member=1).predict(waveform, 16000)


def test_a_member_that_cannot_fit_stops_before_training(tmp_path, monkeypatch, cache):
  from ser_jax import experiment, memory
  from ser_jax.config import default_config

  config = default_config()
  config.data.corpus = "demo"
  config.data.root = str(session_demo_corpus())
  config.data.cache_dir = str(cache)
  config.data.num_workers = 1
  config.model.lowering = "xla"  # The plan reads any lowering's program; XLA's builds fastest.
  config.model.name = "resnet10"
  config.model.width = 4
  config.features.max_seconds = 1.0
  config.cv.n_folds = 2
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 20)
  with pytest.raises(memory.MemoryPlanError) as error:
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "\n" not in message and "available" in message and "batch_size" in message
  assert not (tmp_path / "run" / "fold_0").exists()
