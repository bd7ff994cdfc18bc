"""The whole experiment: corpus -> feature store -> folds -> trained models -> results."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import pathlib
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ser_jax import (
  checkpoints,
  cpu,
  input_pipeline,
  io_utils,
  metrics,
  models,
  plots,
  results,
  train,
)
from ser_jax.audio import AudioError
from ser_jax.config import ConfigError, validate_config
from ser_jax.data import corpora, demo
from ser_jax.features import FeatureParams
from ser_jax.folds import FoldError, make_folds
from ser_jax.sharding import Topology
from ser_jax.store import build_store, default_cache_dir, open_store

# Keys that do not change the mathematics of a run; a rerun may change them without a
# fresh start.
_RESULT_NEUTRAL_KEYS = (
  "data.num_workers",
  "data.cache_dir",
  "cv.folds",
  "train.eval_batch_size",
  "model.lowering",
)


class NonFiniteLossError(FloatingPointError):
  """A NaN or inf training loss; the last good checkpoint is kept."""


class ConfigMismatchError(RuntimeError):
  """The workdir holds a run with a different config."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a (possibly one-member) sweep."""

  gamma: float
  seed: int
  learning_rate: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def members_of(config: ml_collections.ConfigDict) -> list[Member]:
  """The models trained together: one, or every (gamma, seed, learning rate) of the sweep."""
  if not config.sweep.gammas:
    gamma = config.loss.gamma if config.loss.name == "focal" else 0.0
    return [Member(float(gamma), int(config.seed), float(config.train.learning_rate))]
  seeds = config.sweep.seeds or (config.seed,)
  rates = config.sweep.learning_rates or (config.train.learning_rate,)
  return [
    Member(float(g), int(s), float(r)) for g in config.sweep.gammas for s in seeds for r in rates
  ]


def load_corpus(config: ml_collections.ConfigDict):
  root = config.data.root
  if config.data.corpus == "demo" and not (root and demo.is_demo_corpus(root)):
    # The default demo corpus, written on first use; a data.root that already holds a
    # demo corpus (of any size, see write_demo_corpus) is read as it is.
    root = root or str(_cache_dir(config) / "demo_corpus")
    demo.write_demo_corpus(root)
  return corpora.read_corpus(
    config.data.corpus,
    root,
    tuple(config.data.classes),
    include_scripted=config.data.include_scripted,
    merge_excited=config.data.merge_excited,
  )


def check_fold_sizes(corpus, config: ml_collections.ConfigDict) -> None:
  """Fails before feature extraction when a class is too small for stratified folds."""
  if config.cv.scheme != "stratified":
    return
  for name, count in corpus.class_counts().items():
    if count < config.cv.n_folds:
      raise FoldError(
        f"cv.n_folds={config.cv.n_folds} is more than class '{name}' has examples ({count}); "
        f"use cv.n_folds <= {count} or drop the class from data.classes"
      )


def prepare_store(config: ml_collections.ConfigDict, progress: bool | None = None):
  """Reads the corpus and builds (or reuses) its feature store; returns the opened store."""
  corpus = load_corpus(config)
  check_fold_sizes(corpus, config)
  path = build_store(
    corpus,
    FeatureParams.from_config(config.features),
    _cache_dir(config),
    num_workers=config.data.num_workers,
    strict=config.data.strict,
    progress=progress,
  )
  store = open_store(path)
  skipped = _skipped(store)
  if config.data.strict and skipped:
    # A store built earlier without strict may hold skips; strict still refuses them.
    first = skipped[0]
    raise AudioError(
      f"{first['path']}: {first['reason']} ({len(skipped)} bad files in all; listed in "
      f"{store.path / 'skipped.csv'}; data.strict=False skips them)"
    )
  return store


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False
) -> dict:
  """Runs (or resumes) every fold and writes results.json and results.md to `workdir`."""
  validate_config(config)
  workdir = pathlib.Path(workdir)
  is_writer = jax.process_index() == 0
  if fresh and is_writer and workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with io_utils.exclusive_lock(workdir / f"run.lock.{jax.process_index()}", f"workdir {workdir}"):
    if is_writer:
      _check_same_config(config, workdir)
    return _run(config, workdir, is_writer)


def _run(config, workdir: pathlib.Path, is_writer: bool) -> dict:
  start_time = time.time()
  topology = Topology.create()
  topology.check_batch_size("train.batch_size", config.train.batch_size)
  eval_batch_size = config.train.eval_batch_size
  store = prepare_store(config)
  class_names = store.class_names
  logging.info(
    "Feature store %s: %d clips, classes %s", store.path, len(store), store.meta["class_names"]
  )
  for skipped in _skipped(store):
    logging.warning("Skipped %s: %s", skipped["path"], skipped["reason"])
  if store.meta["n_skipped"]:
    logging.warning(
      "%d files skipped; listed in %s", store.meta["n_skipped"], store.path / "skipped.csv"
    )
  folds = make_folds(
    store.labels,
    store.speakers,
    store.groups,
    scheme=config.cv.scheme,
    n_folds=config.cv.n_folds,
    seed=config.seed,
    class_names=class_names,
  )
  members = members_of(config)
  feature_shape = store.features.shape[1:]
  backend = cpu.select_backend(
    config.model.lowering,
    functools.partial(models.create_model, config.model, len(class_names)),
    [(config.train.batch_size, *feature_shape, 1), (eval_batch_size, *feature_shape, 1)],
  )
  logging.info("Lowering: %s", backend.lowering)
  model = models.create_model(config.model, len(class_names), backend.ops)
  chunks = member_chunks(len(members), config.sweep.members_per_chunk)
  programs = {}
  for size in sorted({stop - start for start, stop in chunks}):
    programs[size] = Programs.create(config, model, backend, size, feature_shape, topology)
  fold_ids = list(config.cv.folds) or list(range(config.cv.n_folds))
  log = results.MetricsLog(workdir / "metrics.jsonl", enabled=is_writer)
  fold_results = []
  for fold in fold_ids:
    train_idx, test_idx = folds[fold]
    fold_dir = workdir / f"fold_{fold}"
    done_path = fold_dir / "result.json"
    if done_path.exists():
      logging.info("Fold %d already finished; keeping its result (%s)", fold, done_path)
      fold_results.append(json.loads(done_path.read_text()))
      continue
    fold_dir.mkdir(parents=True, exist_ok=True)
    mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
    if is_writer:
      results.save_normalisation(fold_dir / "normalisation.npz", mean, std)
    counts = []
    for start, stop in chunks:
      # One chunk keeps the plain layout; several get a folder each.
      chunk_name = "" if len(chunks) == 1 else f"members_{start}-{stop - 1}"
      counts += _run_fold(
        config,
        fold_dir / chunk_name,
        workdir / "tensorboard" / f"fold_{fold}" / chunk_name,
        mean,
        std,
        store,
        programs[stop - start],
        members[start:stop],
        start,
        topology,
        fold,
        train_idx,
        test_idx,
        eval_batch_size,
        log,
        is_writer,
      )
    fold_results.append(_save_fold_result(done_path, fold, train_idx, test_idx, counts, is_writer))
  summary = results.summarise_run(
    config=config,
    class_names=class_names,
    members=[m.as_dict() for m in members],
    fold_results=fold_results,
    num_params=_count_params(model, store),
    feature_store=str(store.path),
    skipped=_skipped(store),
    wall_seconds=time.time() - start_time,
  )
  if is_writer:
    results.write_results(workdir, summary)
    plots.write_figures(workdir, summary, log.read())
    logging.info("%s", results.final_line(summary))
  return summary


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of a run, built once so that every fold reuses their compilation."""

  init: Callable  # [members] uint32 seeds, fold -> stacked TrainState
  train_step: Callable  # (stacked state, batch, stacked hparams) -> (state, metrics)
  eval_step: Callable  # (stacked state, batch, extra variables) -> [members, batch, n_classes]
  # (stacked state, batch) -> the backend's extra inference variables for batches of its shape
  inference_variables: Callable

  @classmethod
  def create(
    cls,
    config,
    model,
    backend: cpu.Backend,
    n_members: int,
    feature_shape: tuple[int, int],
    topology: Topology,
  ) -> Programs:
    tx = train.make_optimizer(config.train.weight_decay)
    input_shape = (1, *feature_shape, 1)

    def init(seeds, fold):
      keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), fold))(seeds)
      return jax.vmap(lambda key: train.create_train_state(model, tx, key, input_shape))(keys)

    # Shapes first (eval_shape), then a jitted init that lays the state out replicated.
    abstract = jax.eval_shape(init, jnp.zeros((n_members,), jnp.uint32), 0)
    if config.model.shard_params:
      state_sharding = topology.fsdp(abstract)
    else:
      state_sharding = jax.tree.map(lambda _: topology.replicated, abstract)

    augmentation = train.Augmentation.from_config(config.train)

    def inference_variables(state, batch):
      if backend.inference_variables is None:
        return {}
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      return backend.inference_variables(state.apply_fn, variables, batch["features"][..., None])

    return cls(
      init=jax.jit(init, out_shardings=state_sharding),
      train_step=jax.jit(
        train.over_members(
          functools.partial(
            train.train_step, augmentation=augmentation, gradients_hook=backend.gradients_hook
          ),
          n_members,
        ),
        donate_argnums=(0,) if backend.donate_state else (),
      ),
      eval_step=jax.jit(train.over_members(train.eval_step, n_members)),
      inference_variables=jax.jit(train.over_members(inference_variables, n_members)),
    )


def stacked_hparams(config, members, n_classes: int, fold: int, steps_per_epoch: int):
  """Each member's hyperparameters as arrays with a leading member axis."""
  alpha = tuple(config.loss.alpha) or (1.0,) * n_classes
  per_member = [
    train.make_hparams(
      gamma=m.gamma,
      learning_rate=m.learning_rate,
      alpha=alpha,
      label_smoothing=config.train.label_smoothing,
      rng_seed=m.seed * 1000 + fold,
      warmup_steps=steps_per_epoch * config.train.warmup_epochs,
      total_steps=steps_per_epoch * config.train.num_epochs,
    )
    for m in members
  ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_member)


def member_chunks(n_members: int, members_per_chunk: int) -> list[tuple[int, int]]:
  """[start, stop) ranges of members trained together; 0 means all at once."""
  size = members_per_chunk or n_members
  return [(start, min(start + size, n_members)) for start in range(0, n_members, size)]


def _run_fold(
  config,
  run_dir: pathlib.Path,
  tensorboard_dir: pathlib.Path,
  mean: np.ndarray,
  std: np.ndarray,
  store,
  programs: Programs,
  members,
  first_member: int,
  topology,
  fold,
  train_idx,
  test_idx,
  eval_batch_size,
  log,
  is_writer,
) -> list:
  """Trains one chunk of members on one fold (resuming), returns their confusion counts."""
  done_path = run_dir / "result.json"
  if done_path.exists():  # A finished chunk of a fold that was interrupted later.
    return json.loads(done_path.read_text())["confusion_counts"]
  run_dir.mkdir(parents=True, exist_ok=True)

  steps_per_epoch = len(train_idx) // config.train.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f"fold {fold} has {len(train_idx)} training examples, fewer than train.batch_size="
      f"{config.train.batch_size}; lower train.batch_size"
    )
  n_members = len(members)
  seeds = jnp.array([m.seed for m in members], jnp.uint32)
  state = programs.init(seeds, fold)
  hparams = jax.device_put(
    stacked_hparams(config, members, len(store.class_names), fold, steps_per_epoch),
    topology.replicated,
  )

  manager = checkpoints.checkpoint_manager(run_dir / "checkpoints")
  start_epoch, state = checkpoints.restore_latest(manager, state)
  if start_epoch:
    logging.info(
      "Fold %d: resuming from the checkpoint of epoch %d (step %d)",
      fold,
      start_epoch,
      start_epoch * steps_per_epoch,
    )
    log.truncate(fold, start_epoch, first_member)

  writer = results.TensorBoard(tensorboard_dir, enabled=is_writer)
  epochs = tqdm.trange(
    start_epoch,
    config.train.num_epochs,
    desc=f"fold {fold}",
    unit="epoch",
    disable=None,
    initial=start_epoch,
    total=config.train.num_epochs,
  )
  try:
    for epoch in epochs:
      epoch_start = time.time()
      step_metrics = []
      for batch in input_pipeline.train_batches(
        store,
        train_idx,
        config.train.batch_size,
        mean,
        std,
        seed=config.seed,
        fold=fold,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      ):
        state, step_metric = programs.train_step(state, topology.global_batch(batch), hparams)
        step_metrics.append(step_metric)
      losses = np.asarray(jnp.stack([m["loss"] for m in step_metrics]))  # [steps, members]
      accuracies = np.asarray(jnp.stack([m["accuracy"] for m in step_metrics]))
      if not np.all(np.isfinite(losses)):
        bad_step, bad_member = np.argwhere(~np.isfinite(losses))[0]
        raise NonFiniteLossError(
          f"non-finite training loss ({losses[bad_step, bad_member]}) in fold {fold}, epoch "
          f"{epoch + 1}, step {epoch * steps_per_epoch + bad_step + 1}, member "
          f"{members[bad_member]}; "
          f"the last good checkpoint is kept in {run_dir / 'checkpoints'}"
        )
      record = {
        "fold": fold,
        "first_member": first_member,
        "epoch": epoch + 1,
        "step": (epoch + 1) * steps_per_epoch,
        "train_loss": losses.mean(0).tolist(),
        "train_accuracy": (100 * accuracies.mean(0)).tolist(),
        "seconds": time.time() - epoch_start,
      }
      log.append(record)
      writer.scalars(record, members)
      epochs.set_postfix(loss=f"{losses.mean():.3f}", acc=f"{100 * accuracies.mean():.1f}")
      if (
        epoch + 1
      ) % config.train.checkpoint_every_epochs == 0 or epoch + 1 == config.train.num_epochs:
        checkpoints.save(manager, epoch + 1, state)
  finally:
    # Whatever stops training, the checkpoints already started are committed.
    manager.wait_until_finished()
    writer.close()

  probabilities = predict_probabilities(
    programs, state, store, test_idx, mean, std, eval_batch_size, topology
  )
  predictions = probabilities.argmax(-1)  # [members, n_test]
  n_classes = len(store.class_names)
  counts = [
    metrics.confusion_counts(store.labels[test_idx], predictions[k], n_classes).tolist()
    for k in range(n_members)
  ]
  _save_fold_result(done_path, fold, train_idx, test_idx, counts, is_writer)
  manager.close()
  for k in range(n_members):
    summary = metrics.summarise(np.array(counts[k]))
    logging.info(
      "Fold %d%s: WA %.2f  UA %.2f  macro-F1 %.2f  (train %d, test %d)",
      fold,
      f" member {first_member + k} {members[k]}" if len(members) > 1 or first_member else "",
      summary["overall_accuracy"],
      summary["class_accuracy"],
      summary["macro_f1"],
      len(train_idx),
      len(test_idx),
    )
  return counts


def _save_fold_result(path, fold, train_idx, test_idx, counts, is_writer) -> dict:
  """Writes what a finished fold (or chunk of members) keeps: its size and confusion counts."""
  fold_result = {
    "fold": fold,
    "n_train": int(len(train_idx)),
    "n_test": int(len(test_idx)),
    "confusion_counts": counts,
  }
  if is_writer:
    io_utils.atomic_write_json(path, fold_result)
  return fold_result


def predict_probabilities(
  programs: Programs, state, store, indices, mean, std, batch_size, topology
) -> np.ndarray:
  """[members, len(indices), n_classes] probabilities; each example counted exactly once."""
  # The last batch is padded, so any batch size works once rounded up to the devices.
  batch_size = topology.num_devices * math.ceil(batch_size / topology.num_devices)
  outputs = []
  extra, extra_shape = None, None  # Computed once per batch shape (all equal here).
  for batch, n_real in input_pipeline.eval_batches(
    store,
    indices,
    batch_size,
    mean,
    std,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch = topology.global_batch(batch)
    if batch["features"].shape != extra_shape:
      extra, extra_shape = programs.inference_variables(state, batch), batch["features"].shape
    probabilities = programs.eval_step(state, batch, extra)
    outputs.append(np.asarray(multihost_utils.process_allgather(probabilities, tiled=True)))
    outputs[-1] = outputs[-1][:, :n_real]
  return np.concatenate(outputs, axis=1)


def _count_params(model, store) -> int:
  n_bins, n_frames = store.features.shape[1:]
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, n_bins, n_frames, 1)), train=False)
  )
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def _skipped(store) -> list[dict[str, str]]:
  path = store.path / "skipped.csv"
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _cache_dir(config) -> pathlib.Path:
  return (
    pathlib.Path(config.data.cache_dir).expanduser()
    if config.data.cache_dir
    else default_cache_dir()
  )


def _comparable(config) -> dict:
  flat = json.loads(config.to_json_best_effort())
  for key in _RESULT_NEUTRAL_KEYS:
    group, name = key.split(".")
    flat.get(group, {}).pop(name, None)
  return flat


def _check_same_config(config, workdir: pathlib.Path) -> None:
  path = workdir / "config.json"
  current = _comparable(config)
  if path.exists():
    previous = json.loads(path.read_text())
    if previous != current:
      changed = sorted(
        f"{group}.{key}"
        for group in set(previous) | set(current)
        for key in set(_as_dict(previous.get(group))) | set(_as_dict(current.get(group)))
        if _as_dict(previous.get(group)).get(key) != _as_dict(current.get(group)).get(key)
      )
      raise ConfigMismatchError(
        f"workdir {workdir} holds a run with a different config (changed: "
        f"{', '.join(changed) or 'unknown'}); use another --workdir, or --fresh to discard it"
      )
  else:
    io_utils.atomic_write_json(path, current)


def _as_dict(value) -> dict:
  return value if isinstance(value, dict) else {"": value}
