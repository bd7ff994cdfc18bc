"""The training engine: loops the device runs without the host, folds and members trained
together as each would be alone, and nothing of a test fold reaching its training."""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from helpers import REPO

from ser_jax import checkpoints, cpu, engine, experiment, models, programs, run_data, trainer
from ser_jax.config import default_config
from ser_jax.cpu import onednn
from ser_jax.data.demo import write_demo_corpus
from ser_jax.sharding import Topology

SHAPES = programs.Shapes(
  n_models=1,
  n_members=1,
  feature_shape=(40, 32),
  batch_size=8,
  max_steps=3,
  n_rows=30,
  eval_batches=2,
  eval_batch_size=8,
  n_classes=4,
)


def _backend(lowering: str) -> cpu.Backend:
  if lowering == "onednn" and onednn.unavailable_reason():
    pytest.skip(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  return cpu.backend(lowering)


def _programs(lowering: str, n_models: int, stacking: str) -> programs.Programs:
  backend = _backend(lowering)
  model = models.ResNet10(num_classes=4, width=4, **backend.ops)  # Any depth has its loops.
  shapes = programs.Shapes(**{**SHAPES.__dict__, "n_models": n_models})
  return programs.Programs.create(
    shapes,
    model,
    backend,
    programs.Options(stacking=stacking, weight_decay=1e-2),
    Topology.create(),
  )


def _hparams(n_models: int, steps_per_epoch: int = 3):
  config = default_config()
  members = [engine.Member(float(k), k, 1e-3) for k in range(n_models)]
  return engine.stacked_hparams(config, members, None, 0, steps_per_epoch, tuple("abcd"))


@pytest.mark.parametrize(
  "key, values",
  [
    ("gammas", (0.0, 2.0)),
    ("seeds", (3, 4)),
    ("learning_rates", (1e-3, 1e-4)),
    ("alphas", ((), "inverse_frequency")),
  ],
)
def test_any_sweep_list_trains_one_member_per_entry(key, values):
  config = default_config()
  config.sweep[key] = values
  members = engine.members_of(config)
  field = {"gammas": "gamma", "seeds": "seed", "learning_rates": "learning_rate"}.get(key, "alpha")
  assert [getattr(m, field) for m in members] == list(values)


def test_the_largest_seed_gives_every_fold_its_own_augmentation_stream():
  config = default_config()
  member = engine.Member(2.0, 2**32 - 1, 1e-3)
  seeds = [
    int(engine.stacked_hparams(config, [member], None, fold, 3, tuple("abcd"))["rng_seed"][0])
    for fold in range(5)
  ]
  assert len(set(seeds)) == 5


@pytest.mark.parametrize(
  ("platform", "deterministic", "options"),
  [
    ("gpu", True, {"xla_gpu_deterministic_ops": True}),
    ("gpu", False, {}),
    ("cpu", True, {}),
    ("tpu", True, {}),
  ],
)
def test_deterministic_ops_are_asked_of_a_gpu_only(monkeypatch, platform, deterministic, options):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  config = default_config()
  config.train.deterministic = deterministic
  assert programs.deterministic_options(config) == options


def _loops_without_trip_count(hlo: str) -> list[str]:
  """The while loops of an optimised HLO module whose trip count XLA does not know."""
  loops = [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line)]
  return [line.strip()[:160] for line in loops if "known_trip_count" not in line]


def test_the_trip_count_check_finds_a_loop_whose_length_is_traced():
  """The check below fails on the loop the epoch used to be: fori_loop to a traced bound."""

  def loop(n):
    return jax.lax.fori_loop(0, n, lambda i, x: x + i, 0)

  hlo = jax.jit(loop).lower(3).compile().as_text()
  assert len(_loops_without_trip_count(hlo)) == 1
  fixed = jax.jit(lambda: loop(3)).lower().compile().as_text()
  assert "while(" in fixed and not _loops_without_trip_count(fixed)


@pytest.mark.parametrize(
  ("lowering", "n_models", "stacking"),
  [
    pytest.param("xla", 1, "vmap", marks=pytest.mark.slow),  # The onednn case's program.
    ("onednn", 1, "vmap"),
    ("xla", 2, "vmap"),
    ("xla", 2, "map"),
  ],
)
def test_every_loop_of_the_train_and_eval_programs_has_a_known_trip_count(
  lowering, n_models, stacking
):
  """XLA:GPU copies the predicate of any other loop to the host, every iteration, and of
  every conditional: the accelerators' lowering has none."""
  made = _programs(lowering, n_models, stacking).compile(_hparams(n_models), Topology.create())
  for name in ("train_epoch", "evaluate"):
    hlo = getattr(made, name).as_text()
    assert "while(" in hlo, name  # The epoch's steps and the evaluation's batches loop.
    assert _loops_without_trip_count(hlo) == [], name
    if lowering == "xla":
      assert "conditional(" not in hlo, name
    # Named as the function it compiles, in dumps and profiles alike.
    assert hlo.startswith(f"HloModule jit_{name},"), hlo[:80]


def test_an_epoch_moves_nothing_between_host_and_device_but_its_inputs_and_metrics():
  """Under jax.transfer_guard('disallow') only the explicit device_put of the epoch's batch
  order and the one device_get of its metrics move data."""
  topology = Topology.create()
  made = _programs("xla", 2, "vmap").compile(_hparams(2), topology)
  rng = np.random.default_rng(0)
  rows = {
    "features": rng.normal(size=(30, *SHAPES.feature_shape)).astype(np.float32),
    "labels": rng.integers(0, 4, 30).astype(np.int32),
    "valid_frames": np.full(30, SHAPES.feature_shape[1], np.int32),
  }
  config = default_config()
  config.train.batch_size, config.train.num_epochs = 8, 2
  settings = engine.Settings.from_config(config, topology)
  n_bins = SHAPES.feature_shape[0]
  folds = [
    trainer.Fold(k, np.arange(n), np.arange(24, 30), np.zeros(n_bins), np.ones(n_bins))
    for k, n in enumerate((24, 16))  # 3 and 2 steps of 8.
  ]
  cells = [trainer.Cell(fold, range(1)) for fold in folds]
  fields = dict.fromkeys(trainer.Run.__dataclass_fields__)
  fields.update(
    settings=settings, topology=topology, device_rows=jax.device_put(rows, topology.replicated)
  )
  run = trainer.Run(**fields)
  seeds = jax.device_put(np.arange(2, dtype=np.uint32))
  state = made.init(seeds, jax.device_put(np.arange(2, dtype=np.int32)))
  hparams = jax.device_put(_hparams(2))
  with jax.transfer_guard("disallow"):
    state, metrics = trainer._train_epoch(run, made, cells, state, hparams, [0, 1], [3, 2])
    with pytest.raises(Exception, match="[Dd]isallowed"):  # The guard does catch transfers.
      jax.jit(lambda x: x + 1)(np.zeros(3))
  assert isinstance(metrics["loss"], np.ndarray) and metrics["loss"].shape == (2, 3)
  assert np.all(np.isfinite(metrics["loss"]))
  assert np.asarray(jax.device_get(state.step)).tolist() == [3, 2]  # Fold 1's third is masked.


# --- whole runs on the demo corpus -------------------------------------------------------


def _demo_config():
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config(root: pathlib.Path, corpus: pathlib.Path, **overrides):
  config = _demo_config()
  settings = {
    "data.root": str(corpus),
    "data.cache_dir": str(root / "cache"),
    "data.num_workers": 1,
    "features.max_seconds": 1.0,
    "model.name": "resnet10",
    "model.width": 4,
    "model.lowering": "xla",
    "train.num_epochs": 2,
    "train.warmup_epochs": 1,
    "train.checkpoint_every_epochs": 1,
    "train.batch_size": 3,
    "train.eval_batch_size": 16,
    "cv.n_folds": 2,
    **overrides,
  }
  for key, value in settings.items():
    group, name = key.split(".")
    config[group][name] = value
  return config


def _fold_predictions(workdir: pathlib.Path, fold: int) -> dict[str, np.ndarray]:
  with open(workdir / "predictions.csv", newline="") as f:
    rows = [row for row in csv.DictReader(f) if int(row["fold"]) == fold]
  return {
    row["utt_id"]: np.array([float(v) for k, v in row.items() if k.startswith("p_")])
    for row in rows
  }


@pytest.fixture(scope="module")
def uneven_runs(tmp_path_factory):
  """Two folds of 32 and 33 training clips at batch 3 (10 and 11 steps an epoch), trained
  one at a time, stacked by vmap, stacked by lax.map, and each fold alone."""
  root = tmp_path_factory.mktemp("uneven")
  corpus = write_demo_corpus(root / "corpus", n_utterances=65, n_speakers=4)
  workdirs = {}
  for name, overrides in {
    "none": {"train.models_together": "none"},
    "vmap": {"train.models_together": "vmap"},
    "map": {"train.models_together": "map"},
    "alone_0": {"train.models_together": "none", "cv.folds": (0,)},
    "alone_1": {"train.models_together": "none", "cv.folds": (1,)},
  }.items():
    workdirs[name] = root / name
    experiment.train_and_evaluate(_config(root, corpus, **overrides), str(workdirs[name]))
  return workdirs


def test_folds_of_different_lengths_train_their_own_number_of_steps(uneven_runs):
  steps = {}
  for line in (uneven_runs["vmap"] / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    steps[record["fold"], record["epoch"]] = record["step"]
  assert sorted({steps[0, 1], steps[1, 1]}) == [10, 11]
  assert steps[0, 2] == 2 * steps[0, 1] and steps[1, 2] == 2 * steps[1, 1]


@pytest.mark.parametrize("together", ["none", "vmap", "map"])
@pytest.mark.parametrize("fold", [0, 1])
def test_a_fold_trained_with_the_others_gives_what_it_gives_alone(uneven_runs, together, fold):
  """Each fold of a run, one at a time or stacked, has the predictions it has when trained
  alone (to float32 rounding: stacked convolutions may round differently) and the same
  predicted classes; its parameters too."""
  alone = _fold_predictions(uneven_runs[f"alone_{fold}"], fold)
  stacked = _fold_predictions(uneven_runs[together], fold)
  assert stacked.keys() == alone.keys() and len(alone) in (32, 33)
  for utt_id, probabilities in alone.items():
    np.testing.assert_allclose(stacked[utt_id], probabilities, rtol=0, atol=1e-5)
    assert stacked[utt_id].argmax() == probabilities.argmax(), utt_id
  want = checkpoints.restore_variables(
    uneven_runs[f"alone_{fold}"] / f"fold_{fold}" / "checkpoints"
  )
  got = checkpoints.restore_variables(uneven_runs[together] / f"fold_{fold}" / "checkpoints")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- nothing of a test fold reaches its training -------------------------------------------


def _swap_test_utterances(source: pathlib.Path, other: pathlib.Path, target, test_ids) -> None:
  """`source` copied to `target` with the audio of `test_ids` taken from `other` (a demo
  corpus of another seed) and their labels rotated."""
  shutil.copytree(source, target)
  with open(source / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  classes = ("neutral", "happiness", "sadness", "anger")
  for row in rows:
    if row["utt_id"] in test_ids:
      shutil.copy(other / row["path"], target / row["path"])
      row["label"] = classes[(classes.index(row["label"]) + 1) % 4]
  with open(target / "manifest.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


@pytest.mark.parametrize("together", ["none", "vmap"])
def test_a_folds_test_utterances_do_not_reach_its_training(tmp_path, monkeypatch, together):
  """With fold 0's train and test indices held fixed, other features and labels for its
  test utterances leave its trained parameters bit for bit as they were, with class weights
  from the training fold (loss.alpha='inverse_frequency') and its normalisation."""
  original = write_demo_corpus(tmp_path / "original", n_utterances=48, n_speakers=4)
  other = write_demo_corpus(tmp_path / "other", n_utterances=48, n_speakers=4, seed=7)
  ids = sorted(row["utt_id"] for row in csv.DictReader(open(original / "manifest.csv")))
  test_0 = np.arange(0, 48, 3)  # Fold 0 tests every third clip, fold 1 the rest.
  train_0 = np.setdiff1d(np.arange(48), test_0)
  fixed = [(train_0, test_0), (test_0, train_0)]
  monkeypatch.setattr(run_data, "cross_validation_folds", lambda *args: fixed)
  changed = tmp_path / "changed"
  _swap_test_utterances(original, other, changed, {ids[i] for i in test_0})
  params = {}
  for name, corpus in (("original", original), ("changed", changed)):
    config = _config(
      tmp_path, corpus, **{"train.models_together": together, "loss.alpha": "inverse_frequency"}
    )
    config.train.batch_size = 8
    experiment.train_and_evaluate(config, str(tmp_path / f"run_{name}"))
    params[name] = checkpoints.restore_variables(
      tmp_path / f"run_{name}" / "fold_0" / "checkpoints"
    )
    labels = [row["label"] for row in csv.DictReader(open(corpus / "manifest.csv"))]
    assert len(set(labels)) == 4
  for a, b in zip(
    jax.tree.leaves(params["changed"]), jax.tree.leaves(params["original"]), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  # Fold 1 trains on those utterances, so its parameters do change.
  fold_1 = [
    checkpoints.restore_variables(tmp_path / f"run_{name}" / "fold_1" / "checkpoints")
    for name in ("original", "changed")
  ]
  assert not all(
    np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(v) for v in fold_1), strict=True)
  )
