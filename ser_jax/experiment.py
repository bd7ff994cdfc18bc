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
  layout,
  losses,
  memory,
  metrics,
  models,
  plots,
  results,
  train,
)
from ser_jax.audio import AudioError
from ser_jax.cache import default_cache_dir
from ser_jax.config import ConfigError, validate_config
from ser_jax.data import corpora, demo, shares
from ser_jax.features import FeatureParams
from ser_jax.folds import FoldError, GivenFold, make_folds, partition_line, session_roles
from ser_jax.folds import given_folds as make_given_folds
from ser_jax.sharding import Topology
from ser_jax.store import FeatureStore, build_store, open_store

# Keys that change how a run computes or where it keeps things, but not its results; a
# rerun may change them without a fresh start.
RESULT_NEUTRAL_KEYS = (
  "data.num_workers",
  "data.cache_dir",
  "data.on_device",
  "cv.folds",
  "train.eval_batch_size",
  "model.lowering",
  "sweep.members_per_chunk",
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
  alpha: tuple[float, ...] | str = ()  # Per-class weights, 'inverse_frequency', or none.

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "alpha": _alpha_json(self.alpha)}


def members_of(config: ml_collections.ConfigDict) -> list[Member]:
  """The models trained together: one, or every (gamma, seed, rate, alpha) of the sweep."""
  gamma = float(config.loss.gamma) if config.loss.name == "focal" else 0.0
  sweep = config.sweep
  if not (sweep.gammas or sweep.alphas):
    return [Member(gamma, int(config.seed), float(config.train.learning_rate), config.loss.alpha)]
  return [
    Member(float(g), int(s), float(r), a)
    for g in sweep.gammas or (gamma,)
    for s in sweep.seeds or (config.seed,)
    for r in sweep.learning_rates or (config.train.learning_rate,)
    for a in sweep.alphas or (config.loss.alpha,)
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
    audio_root=config.data.audio_root,
    case_insensitive_paths=config.data.case_insensitive_paths,
  )


def check_fold_sizes(corpus, config: ml_collections.ConfigDict) -> None:
  """Fails before feature extraction when a class is too small for stratified folds."""
  if config.cv.scheme != "stratified" or config.data.test_corpus:
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


def utterances(config: ml_collections.ConfigDict, store: FeatureStore) -> np.ndarray:
  """Indices of the store's utterances the run uses: all, or the data.class_shares subset."""
  if not config.data.class_shares:
    return np.arange(len(store))
  return shares.subset_to_shares(
    store.labels,
    store.speakers,
    tuple(config.data.class_shares),
    config.data.class_shares_seed,
    store.class_names,
  )


def given_roles(store: FeatureStore) -> tuple[np.ndarray, tuple[str, ...]]:
  """(roles [N, n_folds], fold names) of the corpus's own folds: its fold files or manifest
  column, or IEMOCAP's sessions; no folds for other corpora."""
  if store.fold_names:
    return store.fold_roles, store.fold_names
  if store.meta["corpus"] == "iemocap":
    return session_roles(store.groups)
  return np.zeros((len(store), 0), object), ()


def given_folds(store: FeatureStore, kept: np.ndarray) -> list[GivenFold]:
  """The corpus's own folds over the kept utterances, in store indices."""
  roles, names = given_roles(store)
  folds = make_given_folds(roles[kept], names, store.meta["corpus"])
  return [GivenFold(f.name, kept[f.train], kept[f.test], kept[f.valid]) for f in folds]


def cross_validation_folds(config, store: FeatureStore, kept: np.ndarray):
  """(train, test) store indices per fold, made over the kept utterances only."""
  if config.cv.scheme == "given":
    folds = given_folds(store, kept)
    partition, line = partition_line(given_roles(store)[0][kept], store.meta["corpus"])
    logging.log(logging.INFO if partition else logging.WARNING, "%s", line)
    beyond = [k for k in config.cv.folds if k >= len(folds)]
    if beyond:
      raise FoldError(
        f"cv.folds contains {beyond[0]}; {store.meta['corpus']} has {len(folds)} given folds, "
        f"0..{len(folds) - 1} ({', '.join(f.name for f in folds)})"
      )
    return [(f.train, f.test) for f in folds]
  folds = make_folds(
    store.labels[kept],
    store.speakers[kept],
    store.groups[kept],
    scheme=config.cv.scheme,
    n_folds=config.cv.n_folds,
    seed=config.seed,
    class_names=store.class_names,
  )
  return [(kept[train_idx], kept[test_idx]) for train_idx, test_idx in folds]


def prepare_test_store(config: ml_collections.ConfigDict) -> FeatureStore:
  """The store of data.test_corpus, with the run's classes and features."""
  test_config = config.copy_and_resolve_references()
  test_config.data.corpus, test_config.data.root = config.data.test_corpus, config.data.test_root
  return prepare_store(test_config)


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


@dataclasses.dataclass(frozen=True)
class Fold:
  """One fold: its index, its (store) indices and its training normalisation."""

  index: int
  train_idx: np.ndarray
  test_idx: np.ndarray
  mean: np.ndarray  # [n_bins]
  std: np.ndarray  # [n_bins]


@dataclasses.dataclass(frozen=True)
class Run:
  """What every fold of a run shares: its data, members, programs and where it writes."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  store: FeatureStore
  # The store that the folds' test indices refer to: data.test_corpus's, or `store`.
  test_store: FeatureStore
  members: tuple[Member, ...]
  chunks: tuple[range, ...]  # Members trained together, in order.
  programs: dict  # Chunk size -> Programs.
  topology: Topology
  # The store's rows on the device (input_pipeline.load_rows), or None: batches stream.
  device_rows: dict | None
  max_steps: int  # Train steps in an epoch of the largest fold.
  log: results.MetricsLog
  is_writer: bool

  def chunk_dir(self, fold: int, chunk: range) -> pathlib.Path:
    return layout.chunk_dir(self.workdir, fold, chunk, len(self.members))


def _run(config, workdir: pathlib.Path, is_writer: bool) -> dict:
  start_time = time.time()
  topology = Topology.create()
  topology.check_batch_size("train.batch_size", config.train.batch_size)
  store = prepare_store(config)
  _log_store(store)
  kept = utterances(config, store)
  if config.data.test_corpus:  # One fold: every kept utterance against the whole test corpus.
    test_store = prepare_test_store(config)
    _log_store(test_store)
    folds = [(kept, np.arange(len(test_store)))]
  else:
    test_store = store
    folds = cross_validation_folds(config, store, kept)
  members = tuple(members_of(config))
  feature_shape = store.features.shape[1:]
  eval_batch_size = _eval_batch_size(config, topology)
  make_model = functools.partial(models.create_model, config.model, len(store.class_names))
  backend = cpu.select_backend(
    config.model.lowering,
    make_model,
    [(config.train.batch_size, *feature_shape, 1), (eval_batch_size, *feature_shape, 1)],
  )
  logging.info("Lowering: %s", backend.lowering)
  model = make_model(backend.ops)
  device_rows = _device_rows(config, store, topology)
  max_steps = max(len(train_idx) // config.train.batch_size for train_idx, _ in folds)
  chunks, programs = _plan_chunks(
    config, model, backend, members, store, topology, device_rows, max_steps
  )
  run = Run(
    config=config,
    workdir=workdir,
    store=store,
    test_store=test_store,
    members=members,
    chunks=tuple(chunks),
    programs=programs,
    topology=topology,
    device_rows=device_rows,
    max_steps=max_steps,
    log=results.MetricsLog(workdir / "metrics.jsonl", enabled=is_writer),
    is_writer=is_writer,
  )
  fold_results = [run_fold(run, k, *folds[k]) for k in list(config.cv.folds) or range(len(folds))]
  summary = results.summarise_run(
    config=config,
    class_names=store.class_names,
    members=[m.as_dict() for m in members],
    fold_results=fold_results,
    num_params=_count_params(model, store),
    feature_store=str(store.path),
    skipped=_skipped(store),
    class_counts={
      "corpus": _class_counts(store, np.arange(len(store))),
      "used": _class_counts(store, kept),
      **({"test": _class_counts(test_store, folds[0][1])} if config.data.test_corpus else {}),
    },
    given_folds=(
      [{"name": f.name, "n_valid": len(f.valid)} for f in given_folds(store, kept)]
      if config.cv.scheme == "given" and not config.data.test_corpus
      else None
    ),
    provenance=results.provenance(
      {
        **backend.provenance(),
        "deterministic": bool(config.train.deterministic),
        "xla_options": deterministic_options(config),
        "features_on_device": device_rows is not None,
      }
    ),
    wall_seconds=time.time() - start_time,
  )
  if is_writer:
    results.write_results(workdir, summary)
    results.write_predictions(
      workdir / layout.PREDICTIONS,
      store.class_names,
      [layout.fold_dir(workdir, r["fold"]) / layout.PREDICTIONS for r in fold_results],
    )
    plots.write_figures(workdir, summary, run.log.read())
    logging.info("%s", results.final_line(summary))
  return summary


def run_fold(run: Run, index: int, train_idx: np.ndarray, test_idx: np.ndarray) -> dict:
  """Trains every chunk of members on one fold (resuming); returns the fold's result."""
  fold_dir = layout.fold_dir(run.workdir, index)
  done_path = fold_dir / "result.json"
  if done_path.exists():
    logging.info("Fold %d already finished; keeping its result (%s)", index, done_path)
    return json.loads(done_path.read_text())
  fold_dir.mkdir(parents=True, exist_ok=True)
  store = run.store
  mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
  if run.is_writer:
    results.save_normalisation(fold_dir / "normalisation.npz", mean, std)
  fold = Fold(index, train_idx, test_idx, mean, std)
  counts, prediction_files = [], []
  for chunk in run.chunks:
    counts += train_chunk(run, fold, chunk)
    prediction_files.append(run.chunk_dir(index, chunk) / layout.PREDICTIONS)
  if run.is_writer and len(run.chunks) > 1:
    results.write_predictions(fold_dir / layout.PREDICTIONS, store.class_names, prediction_files)
  return _save_fold_result(done_path, fold, counts, run.is_writer)


def deterministic_options(config) -> dict:
  """XLA options that make the run's programs give the same numbers every time: on a GPU,
  deterministic reductions and scatters (train.deterministic); CPUs and TPUs need none."""
  if config.train.deterministic and jax.default_backend() == "gpu":
    return {"xla_gpu_deterministic_ops": True}
  return {}


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of a run, built once so that every fold reuses their compilation."""

  init: Callable  # [members] uint32 seeds, fold -> stacked TrainState
  train_step: Callable  # (stacked state, batch, stacked hparams) -> (state, metrics)
  # (stacked state, device rows, [max_steps, batch] indices, n_steps, mean, std, stacked
  # hparams) -> (state, metrics [max_steps, members]): an epoch in one call.
  train_epoch: Callable
  # (stacked state, batch, extra variables) -> [members, batch, n_classes]
  eval_step: Callable
  # (stacked state, batch) -> the backend's extra inference variables for batches of its
  # shape; None where the backend adds none.
  inference_variables: Callable | None
  state_sharding: object  # Pytree of the stacked state's shardings.

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
    jit = functools.partial(jax.jit, compiler_options=deterministic_options(config) or None)

    def init(seeds, fold):
      keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), fold))(seeds)
      return jax.vmap(lambda key: train.create_train_state(model, tx, key, input_shape))(keys)

    # Shapes first (eval_shape), then a jitted init that lays the state out replicated.
    abstract = jax.eval_shape(init, jnp.zeros((n_members,), jnp.uint32), 0)
    if config.model.shard_params:
      state_sharding = topology.fsdp(abstract)
    else:
      state_sharding = jax.tree.map(lambda _: topology.replicated, abstract)

    step = train.over_members(
      functools.partial(
        train.train_step,
        augmentation=train.Augmentation.from_config(config.train),
        gradients_hook=backend.gradients_hook,
      ),
      n_members,
    )

    def train_epoch(state, rows, order, n_steps, mean, std, hparams):
      def batch_at(i):
        batch = input_pipeline.device_batch(rows, order[i], mean, std)
        return jax.lax.with_sharding_constraint(batch, topology.batch)

      return train.epoch_loop(step, state, hparams, batch_at, n_steps, order.shape[0])

    inference_variables = None
    if backend.inference_variables is not None:

      def extra_variables(state, batch):
        return train.inference_variables(
          state.apply_fn,
          train.state_variables(state),
          batch["features"],
          backend.inference_variables,
        )

      inference_variables = jit(train.over_members(extra_variables, n_members))

    donate = (0,) if backend.donate_state else ()
    return cls(
      init=jit(init, out_shardings=state_sharding),
      train_step=jit(step, donate_argnums=donate),
      train_epoch=jit(train_epoch, donate_argnums=donate),
      eval_step=jit(train.over_members(train.eval_step, n_members)),
      inference_variables=inference_variables,
      state_sharding=state_sharding,
    )

  def compile_training(self, config, n_members, store, topology, device_rows, max_steps):
    """The run's train program for `n_members`, compiled: the epoch on the device where
    `device_rows` are there, else the step on streamed batches."""

    seeds = jnp.zeros((n_members,), jnp.uint32)
    state = _shaped(jax.eval_shape(self.init, seeds, 0), self.state_sharding)
    hparams = jax.eval_shape(
      lambda: stacked_hparams(
        config, [Member(0.0, 0, 1.0)] * n_members, None, 0, 1, store.class_names
      )
    )
    hparams = _shaped(hparams, topology.replicated)
    batch_size, n_bins = config.train.batch_size, store.features.shape[1]
    if device_rows is None:
      stats = np.zeros(n_bins, np.float32)
      batch = input_pipeline.read_batch(store, np.zeros(batch_size, int), stats, stats + 1)
      return self.train_step.lower(state, _shaped(batch, topology.batch), hparams).compile()
    order, n_steps, mean, std = _shaped(
      (
        np.zeros((max_steps, batch_size), np.int32),
        np.int32(0),
        np.zeros(n_bins, np.float32),
        np.zeros(n_bins, np.float32),
      ),
      topology.replicated,
    )
    return self.train_epoch.lower(state, device_rows, order, n_steps, mean, std, hparams).compile()


def _shaped(tree, sharding):
  """ShapeDtypeStructs of `tree`'s arrays laid out by `sharding` (one, or a matching tree)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sharding
  )


def _device_rows(config, store: FeatureStore, topology: Topology) -> dict | None:
  """The store's rows put on every device once (data.on_device), or None to stream them."""
  setting = config.data.on_device
  n_bytes = int(np.prod(store.features.shape)) * 4
  if setting == "never":
    return None
  if jax.process_count() > 1:  # Each process reads its share of every batch from disk.
    if setting == "always":
      logging.warning("data.on_device='always' ignored: batches stream in multi-process runs")
    return None
  available = memory.available_bytes()
  budget = DEVICE_ROWS_SHARE * available if available else DEVICE_ROWS_UNKNOWN_BUDGET
  if setting == "auto" and n_bytes > budget:
    logging.info(
      "Features stream from the store: %s exceed the device budget of %s",
      memory.describe_bytes(n_bytes),
      memory.describe_bytes(budget),
    )
    return None
  logging.info("Features on the device: %s", memory.describe_bytes(n_bytes))
  return jax.device_put(input_pipeline.load_rows(store), topology.replicated)


def _plan_chunks(config, model, backend, members, store, topology, device_rows, max_steps):
  """The member chunks and their Programs: sweep.members_per_chunk or, with 0, as many as
  fit, read from the compiled train program the run then calls (no compile is wasted
  unless the largest chunk does not fit)."""
  n_members = len(members)
  feature_shape = store.features.shape[1:]
  programs = {}
  shared_bytes = 0 if device_rows is None else sum(x.nbytes for x in jax.tree.leaves(device_rows))

  def programs_for(size: int) -> Programs:
    if size not in programs:
      made = Programs.create(config, model, backend, size, feature_shape, topology)
      compiled = made.compile_training(config, size, store, topology, device_rows, max_steps)
      programs[size] = dataclasses.replace(made, **{_TRAIN_FIELD[device_rows is None]: compiled})
    return programs[size]

  per_chunk = config.sweep.members_per_chunk
  if not per_chunk:
    per_chunk = min(n_members, backend.max_members_per_chunk or n_members)
    while True:
      compiled = getattr(programs_for(per_chunk), _TRAIN_FIELD[device_rows is None])
      needed = memory.compiled_bytes(compiled) - shared_bytes
      if jax.default_backend() == "cpu":  # XLA counts per device; a CPU's devices share the host.
        needed *= len(jax.local_devices())
      plan = memory.plan_chunks(
        n_members,
        math.ceil(needed / per_chunk),
        max(memory.available_bytes() - shared_bytes, 0),
        jax.default_backend(),
        max_members_per_chunk=backend.max_members_per_chunk,
      )
      if plan.members_per_chunk >= per_chunk:
        break
      per_chunk = plan.members_per_chunk  # The larger program did not fit.
    logging.info("%s", plan.describe())
  chunks = layout.split_members(n_members, per_chunk)
  for chunk in chunks:
    programs_for(len(chunk))
  return chunks, programs


# Which Programs field holds the compiled train program: streamed or on the device.
_TRAIN_FIELD = {True: "train_step", False: "train_epoch"}
# Share of the memory the run can use that the features may take on the device; with no
# figure for it, features up to this many bytes go there.
DEVICE_ROWS_SHARE = 0.5
DEVICE_ROWS_UNKNOWN_BUDGET = 2 * memory.GiB


def stacked_hparams(
  config, members, fold_labels, fold: int, steps_per_epoch: int, class_names: tuple[str, ...]
):
  """Each member's hyperparameters as arrays with a leading member axis.

  fold_labels: the training fold's labels, for 'inverse_frequency' class weights (None
  when only shapes are wanted).
  class_names: the store's classes (data.classes, or the reader's when that is empty).
  """
  n_classes = len(class_names)
  per_member = [
    train.make_hparams(
      gamma=m.gamma,
      learning_rate=m.learning_rate,
      alpha=class_weights(m.alpha, fold_labels, n_classes, class_names),
      label_smoothing=config.train.label_smoothing,
      rng_seed=m.seed * 1000 + fold,
      warmup_steps=steps_per_epoch * config.train.warmup_epochs,
      total_steps=steps_per_epoch * config.train.num_epochs,
    )
    for m in members
  ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_member)


def class_weights(alpha, fold_labels, n_classes: int, class_names=()) -> np.ndarray:
  """[n_classes] loss weights: given, from the training fold's counts, or all ones."""
  if alpha == "inverse_frequency":
    if fold_labels is None:
      return np.ones(n_classes, np.float32)
    return losses.inverse_frequency_alpha(fold_labels, n_classes, class_names)
  return np.asarray(tuple(alpha) or (1.0,) * n_classes, np.float32)


def train_chunk(run: Run, fold: Fold, chunk: range) -> list:
  """Trains one chunk of members on one fold (resuming); returns their confusion counts."""
  run_dir = run.chunk_dir(fold.index, chunk)
  done_path = run_dir / "result.json"
  if done_path.exists():  # A finished chunk of a fold that was interrupted later.
    return json.loads(done_path.read_text())["confusion_counts"]
  run_dir.mkdir(parents=True, exist_ok=True)
  config, store = run.config, run.store
  members = run.members[chunk.start : chunk.stop]
  programs = run.programs[len(chunk)]
  steps_per_epoch = len(fold.train_idx) // config.train.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f"fold {fold.index} has {len(fold.train_idx)} training examples, fewer than "
      f"train.batch_size={config.train.batch_size}; lower train.batch_size"
    )
  state = programs.init(jnp.array([m.seed for m in members], jnp.uint32), fold.index)
  hparams = jax.device_put(
    stacked_hparams(
      config,
      members,
      store.labels[fold.train_idx],
      fold.index,
      steps_per_epoch,
      store.class_names,
    ),
    run.topology.replicated,
  )
  manager = checkpoints.checkpoint_manager(run_dir / "checkpoints")
  start_epoch, state = checkpoints.restore_latest(manager, state)
  if start_epoch:
    logging.info(
      "Fold %d: resuming from the checkpoint of epoch %d (step %d)",
      fold.index,
      start_epoch,
      start_epoch * steps_per_epoch,
    )
    run.log.truncate(fold.index, start_epoch, chunk.start)
  writer = results.TensorBoard(
    layout.tensorboard_dir(run.workdir, fold.index, chunk, len(run.members)),
    enabled=run.is_writer,
  )
  epochs = tqdm.trange(
    start_epoch,
    config.train.num_epochs,
    desc=f"fold {fold.index}",
    unit="epoch",
    disable=None,
    initial=start_epoch,
    total=config.train.num_epochs,
  )
  try:
    for epoch in epochs:
      state, record = _train_epoch(run, fold, chunk, programs, state, hparams, epoch)
      run.log.append(record)
      writer.scalars(record, members)
      epochs.set_postfix(
        loss=f"{np.mean(record['train_loss']):.3f}", acc=f"{np.mean(record['train_accuracy']):.1f}"
      )
      last = epoch + 1 == config.train.num_epochs
      if (epoch + 1) % config.train.checkpoint_every_epochs == 0 or last:
        checkpoints.save(manager, epoch + 1, state)
  finally:
    # Whatever stops training, the checkpoints already started are committed.
    manager.wait_until_finished()
    writer.close()

  eval_batch_size = _eval_batch_size(config, run.topology)
  test_store = run.test_store
  probabilities = evaluate(programs, state, test_store, fold, eval_batch_size, run.topology)
  predictions = probabilities.argmax(-1)
  n_classes = len(store.class_names)
  counts = [
    metrics.confusion_counts(test_store.labels[fold.test_idx], predictions[k], n_classes).tolist()
    for k in range(len(members))
  ]
  if run.is_writer:
    results.save_fold_predictions(
      run_dir / layout.PREDICTIONS,
      test_store,
      fold.index,
      fold.test_idx,
      chunk.start,
      probabilities,
    )
  _save_fold_result(done_path, fold, counts, run.is_writer)
  manager.close()
  for k, member in enumerate(members):
    summary = metrics.summarise(np.array(counts[k]))
    logging.info(
      "Fold %d%s: WA %.2f  UA %.2f  macro-F1 %.2f  (train %d, test %d)",
      fold.index,
      f" member {chunk.start + k} {member}" if len(run.members) > 1 else "",
      summary["overall_accuracy"],
      summary["class_accuracy"],
      summary["macro_f1"],
      len(fold.train_idx),
      len(fold.test_idx),
    )
  return counts


def _train_epoch(run: Run, fold: Fold, chunk: range, programs, state, hparams, epoch: int):
  """One epoch of train steps; (state, the epoch's metrics record). Stops on a NaN loss."""
  epoch_start = time.time()
  if run.device_rows is not None:
    state, metrics, n_steps = _epoch_on_device(run, fold, programs, state, hparams, epoch)
  else:
    state, metrics, n_steps = _epoch_streamed(run, fold, programs, state, hparams, epoch)
  losses_ = metrics["loss"]  # [steps, members]
  if not np.all(np.isfinite(losses_)):
    bad_step, bad_member = np.argwhere(~np.isfinite(losses_))[0]
    raise NonFiniteLossError(
      f"non-finite training loss ({losses_[bad_step, bad_member]}) in fold {fold.index}, epoch "
      f"{epoch + 1}, step {epoch * n_steps + bad_step + 1}, member "
      f"{run.members[chunk.start + bad_member]}; "
      f"the last good checkpoint is kept in {run.chunk_dir(fold.index, chunk) / 'checkpoints'}"
    )
  record = {
    "fold": fold.index,
    "first_member": chunk.start,
    "epoch": epoch + 1,
    "step": (epoch + 1) * n_steps,
    "train_loss": losses_.mean(0).tolist(),
    "train_accuracy": (100 * metrics["accuracy"].mean(0)).tolist(),
    "learning_rate": metrics["learning_rate"][-1].tolist(),  # At the epoch's last step.
    "seconds": time.time() - epoch_start,
  }
  return state, record


def _epoch_on_device(run: Run, fold: Fold, programs, state, hparams, epoch: int):
  """The epoch as one call on the device's rows; (state, metrics [steps, members], steps)."""
  config = run.config
  order = input_pipeline.batch_indices(
    fold.train_idx, config.train.batch_size, seed=config.seed, fold=fold.index, epoch=epoch
  )
  n_steps = len(order)
  padded = np.zeros((run.max_steps, config.train.batch_size), np.int32)
  padded[:n_steps] = order
  replicated = run.topology.replicated
  state, metrics = programs.train_epoch(
    state,
    run.device_rows,
    *jax.device_put((padded, np.int32(n_steps), fold.mean, fold.std), replicated),
    hparams,
  )
  return state, {name: np.asarray(m)[:n_steps] for name, m in metrics.items()}, n_steps


def _epoch_streamed(run: Run, fold: Fold, programs, state, hparams, epoch: int):
  """The epoch's batches read from the store, each while the step before runs."""
  config = run.config
  batches = input_pipeline.train_batches(
    run.store,
    fold.train_idx,
    config.train.batch_size,
    fold.mean,
    fold.std,
    seed=config.seed,
    fold=fold.index,
    epoch=epoch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  step_metrics = []
  for batch in input_pipeline.prefetch(map(run.topology.global_batch, batches)):
    state, step_metric = programs.train_step(state, batch, hparams)
    step_metrics.append(step_metric)
  metrics = {
    name: np.asarray(jnp.stack([m[name] for m in step_metrics])) for name in step_metrics[0]
  }
  return state, metrics, len(step_metrics)


def _save_fold_result(path, fold: Fold, counts, is_writer) -> dict:
  """Writes what a finished fold (or chunk of members) keeps: its size and confusion counts."""
  fold_result = {
    "fold": fold.index,
    "n_train": int(len(fold.train_idx)),
    "n_test": int(len(fold.test_idx)),
    "confusion_counts": counts,
  }
  if is_writer:
    io_utils.atomic_write_json(path, fold_result)
  return fold_result


def evaluate(
  programs: Programs, state, store: FeatureStore, fold: Fold, batch_size: int, topology: Topology
) -> np.ndarray:
  """[members, n_test, n_classes] probabilities; each test example counted exactly once.

  batch_size is rounded up to a multiple of the devices.
  """
  batch_size = topology.num_devices * math.ceil(batch_size / topology.num_devices)
  outputs = []
  extra, extra_shape = None, None  # Computed once per batch shape.
  for batch, n_real in input_pipeline.eval_batches(
    store,
    fold.test_idx,
    batch_size,
    fold.mean,
    fold.std,
    multiple=topology.num_devices,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch = topology.global_batch(batch)
    if programs.inference_variables and batch["features"].shape != extra_shape:
      extra, extra_shape = programs.inference_variables(state, batch), batch["features"].shape
    probabilities = programs.eval_step(state, batch, extra)
    gathered = np.asarray(multihost_utils.process_allgather(probabilities, tiled=True))
    outputs.append(gathered[:, :n_real])
  return np.concatenate(outputs, axis=1)


def _eval_batch_size(config, topology: Topology) -> int:
  """train.eval_batch_size rounded up to a multiple of the devices (batches are padded)."""
  devices = topology.num_devices
  return devices * math.ceil(config.train.eval_batch_size / devices)


def _log_store(store: FeatureStore) -> None:
  logging.info(
    "Feature store %s: %d clips, classes %s", store.path, len(store), store.meta["class_names"]
  )
  for skipped in _skipped(store):
    logging.warning("Skipped %s: %s", skipped["path"], skipped["reason"])
  if store.meta["n_skipped"]:
    logging.warning(
      "%d files skipped; listed in %s", store.meta["n_skipped"], store.path / "skipped.csv"
    )


def _class_counts(store: FeatureStore, indices: np.ndarray) -> dict[str, int]:
  counts = shares.class_counts(store.labels[indices], len(store.class_names))
  return dict(zip(store.class_names, counts.tolist(), strict=True))


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


def _alpha_json(alpha):
  return alpha if isinstance(alpha, str) else [float(a) for a in alpha]


def _comparable(config_json: dict) -> dict:
  """The config without its result-neutral keys."""
  flat = json.loads(json.dumps(config_json))
  for key in RESULT_NEUTRAL_KEYS:
    group, name = key.split(".")
    flat.get(group, {}).pop(name, None)
  return flat


def _check_same_config(config, workdir: pathlib.Path) -> None:
  """config.json holds the whole config; a rerun must match it up to RESULT_NEUTRAL_KEYS."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    previous, now = _comparable(json.loads(path.read_text())), _comparable(current)
    if previous != now:
      changed = sorted(
        f"{group}.{key}"
        for group in set(previous) | set(now)
        for key in set(_as_dict(previous.get(group))) | set(_as_dict(now.get(group)))
        if _as_dict(previous.get(group)).get(key) != _as_dict(now.get(group)).get(key)
      )
      raise ConfigMismatchError(
        f"workdir {workdir} holds a run with a different config (changed: "
        f"{', '.join(changed) or 'unknown'}); use another --workdir, or --fresh to discard it"
      )
  io_utils.atomic_write_json(path, current)


def _as_dict(value) -> dict:
  return value if isinstance(value, dict) else {"": value}
