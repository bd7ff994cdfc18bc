"""The whole experiment: corpus -> feature store -> folds -> trained models -> results."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import logging
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ser_jax import (
  checkpoints,
  cpu,
  evaluation,
  input_pipeline,
  io_utils,
  layout,
  losses,
  memory,
  metrics,
  models,
  plots,
  programs,
  results,
  train,
)
from ser_jax.audio import AudioError
from ser_jax.cache import default_cache_dir
from ser_jax.config import ConfigError, validate_config
from ser_jax.data import corpora, demo, shares
from ser_jax.data.corpus import Corpus
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
  "train.models_together",
  "train.models_per_program",
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


def prepare_store(
  config: ml_collections.ConfigDict, progress: bool | None = None, corpus: Corpus | None = None
):
  """Builds (or reuses) the feature store of `corpus` (default: the config's, read and
  checked here); returns the opened store."""
  if corpus is None:
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


@dataclasses.dataclass(frozen=True)
class Listing:
  """What folds are made from, per utterance: a feature store's, or a corpus's before its
  features are extracted (the same, unless files are skipped)."""

  corpus: str
  labels: np.ndarray  # [N] class indices
  speakers: np.ndarray  # [N]
  groups: np.ndarray  # [N]
  class_names: tuple[str, ...]
  fold_names: tuple[str, ...] = ()  # The corpus's own folds, if it has any.
  fold_roles: np.ndarray | None = None  # [N, len(fold_names)] 'train', 'test', 'valid' or ''.

  @classmethod
  def of_corpus(cls, corpus: Corpus) -> Listing:
    return cls(
      corpus.name,
      np.asarray(corpus.label_indices()),
      np.array([u.speaker for u in corpus.utterances]),
      np.array([u.group for u in corpus.utterances]),
      corpus.class_names,
      corpus.fold_names,
      np.array([u.splits for u in corpus.utterances], dtype=object).reshape(
        len(corpus.utterances), len(corpus.fold_names)
      ),
    )

  @classmethod
  def of_store(cls, store: FeatureStore) -> Listing:
    return cls(
      store.corpus,
      store.labels,
      store.speakers,
      store.groups,
      store.class_names,
      store.fold_names,
      store.fold_roles,
    )

  def __len__(self) -> int:
    return len(self.labels)


def utterances(config: ml_collections.ConfigDict, listing) -> np.ndarray:
  """Indices of the utterances the run uses: all, or the data.class_shares subset.

  listing: a Listing, or a FeatureStore.
  """
  if not config.data.class_shares:
    return np.arange(len(listing))
  return shares.subset_to_shares(
    listing.labels,
    listing.speakers,
    tuple(config.data.class_shares),
    config.data.class_shares_seed,
    listing.class_names,
  )


def given_roles(listing) -> tuple[np.ndarray, tuple[str, ...]]:
  """(roles [N, n_folds], fold names) of the corpus's own folds: its fold files or manifest
  column, or IEMOCAP's sessions; no folds for other corpora.

  listing: a Listing, or a FeatureStore.
  """
  if listing.fold_names:
    return listing.fold_roles, listing.fold_names
  if listing.corpus == "iemocap":
    return session_roles(listing.groups)
  return np.zeros((len(listing), 0), object), ()


def given_folds(listing, kept: np.ndarray) -> list[GivenFold]:
  """The corpus's own folds over the kept utterances, in listing indices."""
  roles, names = given_roles(listing)
  folds = make_given_folds(roles[kept], names, listing.corpus)
  return [GivenFold(f.name, kept[f.train], kept[f.test], kept[f.valid]) for f in folds]


def cross_validation_folds(config, listing, kept: np.ndarray):
  """(train, test) indices per fold, made over the kept utterances only.

  listing: a Listing, or a FeatureStore.
  """
  if config.cv.scheme == "given":
    folds = given_folds(listing, kept)
    partition, line = partition_line(given_roles(listing)[0][kept], listing.corpus)
    logging.log(logging.INFO if partition else logging.WARNING, "%s", line)
    beyond = [k for k in config.cv.folds if k >= len(folds)]
    if beyond:
      raise FoldError(
        f"cv.folds contains {beyond[0]}; {listing.corpus} has {len(folds)} given folds, "
        f"0..{len(folds) - 1} ({', '.join(f.name for f in folds)})"
      )
    return [(f.train, f.test) for f in folds]
  folds = make_folds(
    listing.labels[kept],
    listing.speakers[kept],
    listing.groups[kept],
    scheme=config.cv.scheme,
    n_folds=config.cv.n_folds,
    seed=config.seed,
    class_names=listing.class_names,
  )
  return [(kept[train_idx], kept[test_idx]) for train_idx, test_idx in folds]


def run_folds(config, listing, test_size: int | None = None):
  """(kept utterances, [(train, test) indices] per fold): cross-validation folds, or with
  a test corpus of `test_size` utterances one fold of every kept utterance against it."""
  kept = utterances(config, listing)
  if test_size is not None:
    return kept, [(kept, np.arange(test_size))]
  return kept, cross_validation_folds(config, listing, kept)


def test_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of data.test_corpus: the run's classes and features on its corpus."""
  copied = config.copy_and_resolve_references()
  copied.data.corpus, copied.data.root = config.data.test_corpus, config.data.test_root
  return copied


def prepare_test_store(config: ml_collections.ConfigDict) -> FeatureStore:
  """The store of data.test_corpus, with the run's classes and features."""
  return prepare_store(test_config(config))


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
class Settings:
  """The config's training keys, read once into plain values."""

  num_epochs: int
  batch_size: int
  eval_batch_size: int  # Rounded up to a multiple of the devices.
  checkpoint_every_epochs: int
  seed: int
  models_together: str  # 'vmap', 'map' or 'none' (never 'auto').
  models_per_program: int  # 0: as many as fit.
  on_device: str
  weight_decay: float
  augmentation: train.Augmentation
  shard_params: bool
  compiler_options: dict

  @classmethod
  def from_config(cls, config, topology: Topology) -> Settings:
    devices = topology.num_devices
    together = models_together(config.train.models_together)
    if together == "none" and config.train.models_per_program > 1:
      logging.warning(
        "train.models_per_program=%d not used: train.models_together='auto' trains one model "
        "at a time here; set it to 'vmap' or 'map' to stack models",
        config.train.models_per_program,
      )
    return cls(
      num_epochs=config.train.num_epochs,
      batch_size=config.train.batch_size,
      eval_batch_size=devices * math.ceil(config.train.eval_batch_size / devices),
      checkpoint_every_epochs=config.train.checkpoint_every_epochs,
      seed=config.seed,
      models_together=together,
      models_per_program=config.train.models_per_program,
      on_device=config.data.on_device,
      weight_decay=config.train.weight_decay,
      augmentation=train.Augmentation.from_config(config.train),
      shard_params=config.model.shard_params,
      compiler_options=deterministic_options(config),
    )


def models_together(setting: str, platform: str | None = None) -> str:
  """train.models_together, with 'auto' resolved for the platform: one model at a time on
  CPUs, where stacking measured no faster (benchmarks/NOTES.md, "Models together"), and
  vmapped on accelerators."""
  if setting != "auto":
    return setting
  return "none" if (platform or jax.default_backend()) == "cpu" else "vmap"


def deterministic_options(config) -> dict:
  """XLA options that make the run's programs give the same numbers every time: on a GPU,
  deterministic reductions and scatters (train.deterministic); CPUs and TPUs need none."""
  if config.train.deterministic and jax.default_backend() == "gpu":
    return {"xla_gpu_deterministic_ops": True}
  return {}


@dataclasses.dataclass(frozen=True)
class Fold:
  """One fold: its index, its (store) indices and its training normalisation."""

  index: int
  train_idx: np.ndarray
  test_idx: np.ndarray
  mean: np.ndarray  # [n_bins]
  std: np.ndarray  # [n_bins]


@dataclasses.dataclass(frozen=True)
class Cell:
  """Members of a sweep on one fold: what one checkpoint folder holds."""

  fold: Fold
  members: range


@dataclasses.dataclass(frozen=True)
class Engine:
  """How a run trains: its backend and model, its cells grouped into programs, and the
  compiled programs for each group's (models, members per cell)."""

  backend: cpu.Backend
  model: models.ResNet
  shapes: programs.Shapes  # The shapes the programs were compiled for.
  groups: tuple[tuple[tuple[int, range], ...], ...]  # (fold, members) cells per program.
  programs: dict  # (n_models, n_members) -> compiled programs.Programs

  def programs_for(self, cells) -> programs.Programs:
    return self.programs[sum(len(c.members) for c in cells), len(cells[0].members)]


@dataclasses.dataclass(frozen=True)
class Run:
  """What every fold of a run shares: its data, members, engine and where it writes."""

  config: ml_collections.ConfigDict
  settings: Settings
  workdir: pathlib.Path
  store: FeatureStore
  # The store that the folds' test indices refer to: data.test_corpus's, or `store`.
  test_store: FeatureStore
  members: tuple[Member, ...]
  engine: Engine
  topology: Topology
  # The store's rows on the device (input_pipeline.load_rows), or None: batches stream.
  device_rows: dict | None
  log: results.MetricsLog
  is_writer: bool

  def cell_dir(self, cell: Cell) -> pathlib.Path:
    return layout.chunk_dir(self.workdir, cell.fold.index, cell.members, len(self.members))


def _run(config, workdir: pathlib.Path, is_writer: bool) -> dict:
  start_time = time.time()
  topology = Topology.create()
  topology.check_batch_size("train.batch_size", config.train.batch_size)
  settings = Settings.from_config(config, topology)
  members = tuple(members_of(config))
  corpus = load_corpus(config)
  check_fold_sizes(corpus, config)
  test_corpus = load_corpus(test_config(config)) if config.data.test_corpus else None
  n_bins_frames = FeatureParams.from_config(config.features)
  feature_shape = (n_bins_frames.n_bins, n_bins_frames.n_frames)
  listed_folds = run_folds(
    config, Listing.of_corpus(corpus), len(test_corpus.utterances) if test_corpus else None
  )[1]
  n_rows = _rows_on_device(settings, len(corpus.utterances), feature_shape)
  # The programs compile in a thread while the features are extracted: their shapes are
  # the listing's, which the store's equal unless files are skipped.
  expected = _shapes(settings, config, members, listed_folds, feature_shape, n_rows, corpus)
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
    engine_future = pool.submit(
      build_engine,
      config,
      settings,
      members,
      expected,
      _fold_indices(config, listed_folds),
      topology,
    )
    store = prepare_store(config, corpus=corpus)
    _log_store(store)
    test_store = prepare_store(test_config(config), corpus=test_corpus) if test_corpus else store
    if test_corpus:
      _log_store(test_store)
    engine = engine_future.result()
  kept, fold_indices = run_folds(
    config, Listing.of_store(store), len(test_store) if test_corpus else None
  )
  shapes = _shapes(settings, config, members, fold_indices, feature_shape, n_rows, store)
  if shapes != engine.shapes:
    logging.info("Files were skipped: the programs are compiled again for the store's folds")
    engine = build_engine(
      config, settings, members, shapes, _fold_indices(config, fold_indices), topology
    )
  device_rows = None
  if n_rows is not None:
    device_rows = jax.device_put(_padded_rows(store, n_rows), topology.replicated)
    logging.info("Features on the device: %s", memory.describe_bytes(_rows_bytes(store)))
  run = Run(
    config=config,
    settings=settings,
    workdir=workdir,
    store=store,
    test_store=test_store,
    members=members,
    engine=engine,
    topology=topology,
    device_rows=device_rows,
    log=results.MetricsLog(workdir / "metrics.jsonl", enabled=is_writer),
    is_writer=is_writer,
  )
  folds = {k: make_fold(run, k, *fold_indices[k]) for k in _fold_indices(config, fold_indices)}
  fold_results = {k: _finished_fold(run, k) for k in folds}
  for group in engine.groups:
    cells = [Cell(folds[k], chunk) for k, chunk in group if fold_results[k] is None]
    if cells:
      train_cells(run, cells)
    for k, _ in group:
      if fold_results[k] is None and all(
        _cell_result(run, Cell(folds[k], chunk)) is not None for f, chunk in _cells_of(engine, k)
      ):
        fold_results[k] = finish_fold(run, folds[k], [chunk for _, chunk in _cells_of(engine, k)])
  fold_results = [fold_results[k] for k in folds]
  summary = results.summarise_run(
    config=config,
    class_names=store.class_names,
    members=[m.as_dict() for m in members],
    fold_results=fold_results,
    num_params=_count_params(engine.model, feature_shape),
    feature_store=str(store.path),
    skipped=_skipped(store),
    class_counts={
      "corpus": _class_counts(store, np.arange(len(store))),
      "used": _class_counts(store, kept),
      **({"test": _class_counts(test_store, fold_indices[0][1])} if test_corpus else {}),
    },
    given_folds=(
      [
        {"name": f.name, "n_valid": len(f.valid)}
        for f in given_folds(Listing.of_store(store), kept)
      ]
      if config.cv.scheme == "given" and not config.data.test_corpus
      else None
    ),
    provenance=results.provenance(
      {
        **engine.backend.provenance(),
        "deterministic": bool(config.train.deterministic),
        "xla_options": settings.compiler_options,
        "features_on_device": device_rows is not None,
        "models_together": settings.models_together,
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


def _fold_indices(config, folds) -> list[int]:
  """The folds this run trains: cv.folds, or all."""
  return list(config.cv.folds) or list(range(len(folds)))


def _cells_of(engine: Engine, fold: int) -> list[tuple[int, range]]:
  return [cell for group in engine.groups for cell in group if cell[0] == fold]


def _shapes(settings, config, members, folds, feature_shape, n_rows, listing) -> programs.Shapes:
  """The Shapes of a run's largest program, from its folds' sizes (programs.Shapes)."""
  trained = [folds[k] for k in _fold_indices(config, folds)]
  max_steps = max(len(train_idx) // settings.batch_size for train_idx, _ in trained)
  if max_steps == 0:
    smallest = min(len(train_idx) for train_idx, _ in trained)
    raise ConfigError(
      f"a fold has {smallest} training examples, fewer than "
      f"train.batch_size={settings.batch_size}; lower train.batch_size"
    )
  largest_test = max(len(test_idx) for _, test_idx in trained)
  return programs.Shapes(
    n_models=len(trained) * len(members),
    n_members=len(members),
    feature_shape=feature_shape,
    batch_size=settings.batch_size,
    max_steps=max_steps,
    n_rows=n_rows,
    eval_batches=math.ceil(largest_test / settings.eval_batch_size),
    eval_batch_size=settings.eval_batch_size,
    n_classes=len(listing.class_names),
  )


def build_engine(config, settings: Settings, members, shapes: programs.Shapes, folds, topology):
  """The backend, the model, the cells' grouping into programs (memory.py's plan) and the
  compiled programs of every group; `shapes` are those of all the run's models at once."""
  make_model = functools.partial(models.create_model, config.model, shapes.n_classes)
  train_shape = (settings.batch_size, *shapes.feature_shape, 1)
  backend = cpu.select_backend(
    config.model.lowering, make_model, [train_shape, (settings.eval_batch_size, *train_shape[1:])]
  )
  logging.info("Lowering: %s; models together: %s", backend.lowering, settings.models_together)
  model = make_model(backend.ops)
  n_members, n_models = len(members), shapes.n_models
  compiled = {}

  def programs_for(k: int, m: int) -> programs.Programs:
    if (k, m) not in compiled:
      made = programs.Programs.create(
        dataclasses.replace(shapes, n_models=k, n_members=m),
        model,
        backend,
        stacking=settings.models_together if k > 1 else "vmap",
        weight_decay=settings.weight_decay,
        augmentation=settings.augmentation,
        shard_params=settings.shard_params,
        compiler_options=settings.compiler_options,
        topology=topology,
      )
      hparams = jax.eval_shape(
        lambda: stacked_hparams(
          config, [members[0]] * k, None, 0, 1, tuple(map(str, range(shapes.n_classes)))
        )
      )
      compiled[k, m] = made.compile(hparams, topology)
    return compiled[k, m]

  if shapes.n_rows is None:  # Streamed batches: one fold per program, its members share them.
    n_models = n_members
  at_most = 1 if settings.models_together == "none" else settings.models_per_program
  # As many as fit, read from the largest program, which the run then calls; a smaller
  # one is compiled only where that does not fit.
  largest = min(at_most or n_models, n_models)
  per_program = math.ceil(n_models / math.ceil(n_models / largest))  # Even chunks.
  while True:
    train_program = _train_program(programs_for(per_program, min(per_program, n_members)))
    rows_bytes = 0 if shapes.n_rows is None else shapes.n_rows * math.prod(shapes.feature_shape) * 4
    needed = memory.compiled_bytes(train_program) - rows_bytes
    if jax.default_backend() == "cpu":  # XLA counts per device; a CPU's devices share the host.
      needed *= len(jax.local_devices())
    plan = memory.plan_chunks(
      n_models,
      math.ceil(needed / per_program),
      max(memory.available_bytes() - rows_bytes, 0),
      jax.default_backend(),
      at_most=at_most,
    )
    if plan.models_per_chunk >= per_program:
      break
    per_program = plan.models_per_chunk  # The larger program did not fit.
  logging.info("%s", plan.describe())
  groups = memory.group_cells(folds, n_members, per_program)
  for group in groups:
    programs_for(sum(len(chunk) for _, chunk in group), len(group[0][1]))
  return Engine(backend, model, shapes, tuple(tuple(g) for g in groups), compiled)


def _train_program(made: programs.Programs):
  return made.train_step if made.shapes.n_rows is None else made.train_epoch


# Share of the memory the run can use that the features may take on the device; with no
# figure for it, features up to this many bytes go there.
DEVICE_ROWS_SHARE = 0.5
DEVICE_ROWS_UNKNOWN_BUDGET = 2 * memory.GiB


def _rows_on_device(settings: Settings, n_rows: int, feature_shape) -> int | None:
  """How many rows the features take on the device (data.on_device), or None to stream."""
  setting = settings.on_device
  n_bytes = n_rows * math.prod(feature_shape) * 4
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
  return n_rows


def _rows_bytes(store: FeatureStore) -> int:
  return int(np.prod(store.features.shape)) * 4


def _padded_rows(store: FeatureStore, n_rows: int) -> dict:
  """The store's rows (input_pipeline.load_rows), padded with zeros to the corpus's
  `n_rows` (skipped files leave rows that no index reaches)."""
  rows = input_pipeline.load_rows(store)
  return {
    name: np.concatenate([x, np.zeros((n_rows - len(x), *x.shape[1:]), x.dtype)])
    for name, x in rows.items()
  }


def make_fold(run: Run, index: int, train_idx: np.ndarray, test_idx: np.ndarray) -> Fold:
  """The fold with its normalisation, from its training utterances only (saved)."""
  store = run.store
  mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
  if run.is_writer and not (layout.fold_dir(run.workdir, index) / "result.json").exists():
    layout.fold_dir(run.workdir, index).mkdir(parents=True, exist_ok=True)
    results.save_normalisation(layout.fold_dir(run.workdir, index) / "normalisation.npz", mean, std)
  return Fold(index, train_idx, test_idx, mean, std)


def _finished_fold(run: Run, index: int) -> dict | None:
  path = layout.fold_dir(run.workdir, index) / "result.json"
  if not path.exists():
    return None
  logging.info("Fold %d already finished; keeping its result (%s)", index, path)
  return json.loads(path.read_text())


def _cell_result(run: Run, cell: Cell) -> dict | None:
  path = run.cell_dir(cell) / "result.json"
  return json.loads(path.read_text()) if path.exists() else None


def finish_fold(run: Run, fold: Fold, chunks: list[range]) -> dict:
  """The fold's result from its cells' (one per member chunk), written to its folder."""
  counts = []
  for chunk in chunks:
    counts += _cell_result(run, Cell(fold, chunk))["confusion_counts"]
  fold_dir = layout.fold_dir(run.workdir, fold.index)
  if run.is_writer and len(chunks) > 1:
    results.write_predictions(
      fold_dir / layout.PREDICTIONS,
      run.store.class_names,
      [run.cell_dir(Cell(fold, chunk)) / layout.PREDICTIONS for chunk in chunks],
    )
  return results.save_fold_result(
    fold_dir / "result.json", fold.index, fold.train_idx, fold.test_idx, counts, run.is_writer
  )


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


def _concatenate(trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def train_cells(run: Run, cells: list[Cell]) -> None:
  """Trains the cells' models together in one program, each from its latest checkpoint,
  then evaluates each cell and writes its results (cells already finished stay so)."""
  settings, store = run.settings, run.store
  made = run.engine.programs_for(cells)
  m = len(cells[0].members)
  firsts = [i * m for i in range(len(cells))]
  seeds = np.array([run.members[j].seed for c in cells for j in c.members], np.uint32)
  fold_of_model = np.array([c.fold.index for c in cells for _ in c.members], np.int32)
  state = made.init(*jax.device_put((seeds, fold_of_model), run.topology.replicated))
  steps = [len(c.fold.train_idx) // settings.batch_size for c in cells]
  hparams = jax.device_put(
    _concatenate(
      [
        stacked_hparams(
          run.config,
          run.members[c.members.start : c.members.stop],
          store.labels[c.fold.train_idx],
          c.fold.index,
          n,
          store.class_names,
        )
        for c, n in zip(cells, steps, strict=True)
      ]
    ),
    run.topology.replicated,
  )
  managers, epochs, writers = [], [], []
  for cell, first, n in zip(cells, firsts, steps, strict=True):
    manager = checkpoints.checkpoint_manager(run.cell_dir(cell) / "checkpoints")
    managers.append(manager)
    if _cell_result(run, cell) is not None:  # Finished; its models stay masked.
      epochs.append(settings.num_epochs)
      writers.append(None)
      continue
    start_epoch, restored = checkpoints.restore_latest(manager, made.take_cell(state, first))
    if start_epoch:
      logging.info(
        "Fold %d: resuming from the checkpoint of epoch %d (step %d)",
        cell.fold.index,
        start_epoch,
        start_epoch * n,
      )
      run.log.truncate(cell.fold.index, start_epoch, cell.members.start)
      state = made.put_cell(state, restored, first)
    epochs.append(start_epoch)
    writers.append(
      results.TensorBoard(
        layout.tensorboard_dir(run.workdir, cell.fold.index, cell.members, len(run.members)),
        enabled=run.is_writer,
      )
    )
  names = ", ".join(str(c.fold.index) for c in cells)
  progress = tqdm.tqdm(
    desc=f"fold{'s' if len(cells) > 1 else ''} {names}",
    unit="epoch",
    disable=None,
    initial=min(epochs),
    total=settings.num_epochs,
  )
  try:
    while min(epochs) < settings.num_epochs:
      epoch_start = time.time()
      state, epoch_metrics = _train_epoch(run, made, cells, state, hparams, epochs, steps)
      seconds = time.time() - epoch_start
      for i, (cell, first, n) in enumerate(zip(cells, firsts, steps, strict=True)):
        if epochs[i] >= settings.num_epochs:
          continue
        cell_metrics = {name: x[first : first + m, :n].T for name, x in epoch_metrics.items()}
        record = _epoch_record(run, cell, cell_metrics, epochs[i], n, seconds)
        run.log.append(record)
        writers[i].scalars(record, run.members[cell.members.start : cell.members.stop])
        epochs[i] += 1
        if epochs[i] % settings.checkpoint_every_epochs == 0 or epochs[i] == settings.num_epochs:
          checkpoints.save(managers[i], epochs[i], made.take_cell(state, first))
      progress.update(min(epochs) - progress.n)
  finally:
    # Whatever stops training, the checkpoints already started are committed.
    progress.close()
    for manager in managers:
      manager.wait_until_finished()
    for writer in writers:
      if writer is not None:
        writer.close()
  for cell, first, manager in zip(cells, firsts, managers, strict=True):
    if _cell_result(run, cell) is None:
      evaluate_cell(run, made, cell, made.take_cell(state, first))
    manager.close()


def _train_epoch(run: Run, made, cells, state, hparams, epochs, steps):
  """One epoch of every cell not yet trained to the end (the others' steps are masked);
  (state, metrics {name: [models, max_steps]} on the host)."""
  settings = run.settings
  if run.device_rows is None:  # One cell, its batches streamed from the store.
    (cell,) = cells
    return _epoch_streamed(run, made, cell, state, hparams, epochs[0])
  shapes, m = made.shapes, len(cells[0].members)
  order = np.zeros((shapes.n_models, shapes.max_steps, settings.batch_size), np.int32)
  n_steps = np.zeros(shapes.n_models, np.int32)
  means = np.zeros((shapes.n_models, shapes.feature_shape[0]), np.float32)
  stds = np.ones_like(means)
  for i, (cell, n) in enumerate(zip(cells, steps, strict=True)):
    rows = slice(i * m, (i + 1) * m)
    means[rows], stds[rows] = cell.fold.mean, cell.fold.std
    if epochs[i] < settings.num_epochs:
      order[rows, :n] = input_pipeline.batch_indices(
        cell.fold.train_idx,
        settings.batch_size,
        seed=settings.seed,
        fold=cell.fold.index,
        epoch=epochs[i],
      )
      n_steps[rows] = n
  state, epoch_metrics = made.train_epoch(
    state,
    run.device_rows,
    *jax.device_put((order, n_steps, means, stds), run.topology.replicated),
    hparams,
  )
  return state, jax.device_get(epoch_metrics)


def _epoch_streamed(run: Run, made, cell: Cell, state, hparams, epoch: int):
  """The epoch's batches read from the store, each while the step before runs."""
  settings = run.settings
  batches = input_pipeline.train_batches(
    run.store,
    cell.fold.train_idx,
    settings.batch_size,
    cell.fold.mean,
    cell.fold.std,
    seed=settings.seed,
    fold=cell.fold.index,
    epoch=epoch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  step_metrics = []
  for batch in input_pipeline.prefetch(map(run.topology.global_batch, batches)):
    state, step_metric = made.train_step(state, batch, hparams)
    step_metrics.append(step_metric)
  # [models, steps], as the epoch on the device gives them.
  return state, jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs, 1), *step_metrics))


def _epoch_record(run: Run, cell: Cell, cell_metrics: dict, epoch: int, n_steps: int, seconds):
  """The metrics.jsonl record of a cell's epoch (metrics [steps, members]); stops on a NaN."""
  losses_ = cell_metrics["loss"]
  if not np.all(np.isfinite(losses_)):
    bad_step, bad_member = np.argwhere(~np.isfinite(losses_))[0]
    raise NonFiniteLossError(
      f"non-finite training loss ({losses_[bad_step, bad_member]}) in fold {cell.fold.index}, "
      f"epoch {epoch + 1}, step {epoch * n_steps + bad_step + 1}, member "
      f"{run.members[cell.members.start + bad_member]}; "
      f"the last good checkpoint is kept in {run.cell_dir(cell) / 'checkpoints'}"
    )
  return {
    "fold": cell.fold.index,
    "first_member": cell.members.start,
    "epoch": epoch + 1,
    "step": (epoch + 1) * n_steps,
    "train_loss": losses_.mean(0).tolist(),
    "train_accuracy": (100 * cell_metrics["accuracy"].mean(0)).tolist(),
    "learning_rate": cell_metrics["learning_rate"][-1].tolist(),  # At the epoch's last step.
    "seconds": seconds,
  }


def evaluate_cell(run: Run, made, cell: Cell, state) -> None:
  """Tests a cell's trained members on its fold; writes its predictions and result.json."""
  test_store, fold = run.test_store, cell.fold
  probabilities = evaluation.evaluate(
    made.evaluate, state, test_store, fold.test_idx, fold.mean, fold.std, made.shapes, run.topology
  )
  n_classes = len(run.store.class_names)
  labels = test_store.labels[fold.test_idx]
  counts = [
    metrics.confusion_counts(labels, p.argmax(-1), n_classes).tolist() for p in probabilities
  ]
  run_dir = run.cell_dir(cell)
  if run.is_writer:
    results.save_fold_predictions(
      run_dir / layout.PREDICTIONS,
      test_store,
      fold.index,
      fold.test_idx,
      cell.members.start,
      probabilities,
    )
  results.save_fold_result(
    run_dir / "result.json", fold.index, fold.train_idx, fold.test_idx, counts, run.is_writer
  )
  for k, j in enumerate(cell.members):
    summary = metrics.summarise(np.array(counts[k]))
    logging.info(
      "Fold %d%s: WA %.2f  UA %.2f  macro-F1 %.2f  (train %d, test %d)",
      fold.index,
      f" member {j} {run.members[j]}" if len(run.members) > 1 else "",
      summary["overall_accuracy"],
      summary["class_accuracy"],
      summary["macro_f1"],
      len(fold.train_idx),
      len(fold.test_idx),
    )


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


def _count_params(model, feature_shape) -> int:
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, *feature_shape, 1)), train=False)
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
  from ser_jax import config_tree

  return config_tree.without(config_json, RESULT_NEUTRAL_KEYS)


def _check_same_config(config, workdir: pathlib.Path) -> None:
  """config.json holds the whole config; a rerun must match it up to RESULT_NEUTRAL_KEYS."""
  from ser_jax import config_tree

  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    changed = config_tree.diff(_comparable(json.loads(path.read_text())), _comparable(current))
    if changed:
      raise ConfigMismatchError(
        f"workdir {workdir} holds a run with a different config (changed: "
        f"{', '.join(changed)}); use another --workdir, or --fresh to discard it"
      )
  io_utils.atomic_write_json(path, current)


def _as_dict(value) -> dict:
  return value if isinstance(value, dict) else {"": value}
