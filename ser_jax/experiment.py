"""The whole experiment: corpus -> feature store -> folds -> trained models -> results.

`train_and_evaluate` is the entry point. The parts live apart: the run's data and folds in
`run_data`, its settings, models and compiled programs in `engine` (planned by `memory`),
the epochs and checkpoints in `trainer`, the pure steps in `train`, testing in
`evaluation`, and the files in `results`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from ser_jax import (
  config_tree,
  evaluation,
  input_pipeline,
  io_utils,
  layout,
  memory,
  metrics,
  plots,
  results,
  run_results,
)
from ser_jax import run_data as data
from ser_jax.config import validate_config
from ser_jax.engine import Engine, Settings, build_engine, members_of, program_shapes
from ser_jax.features import FeatureParams
from ser_jax.sharding import Topology
from ser_jax.trainer import Cell, Fold, Run, cell_states, train_cells

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


class ConfigMismatchError(RuntimeError):
  """The workdir holds a run with a different config."""


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False
) -> run_results.RunResults:
  """Runs (or resumes) every fold and writes results.json and results.md to `workdir`."""
  validate_config(config)
  workdir = pathlib.Path(workdir)
  is_writer = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  with _workdir_locks(config, workdir, fresh):
    if fresh and is_writer:
      _empty_workdir(workdir)
    if is_writer or not fresh:  # Every process: none trains what process 0 refuses.
      check_same_config(config, workdir)
    return _run(config, workdir, is_writer)


@contextlib.contextmanager
def _workdir_locks(config, workdir: pathlib.Path, fresh: bool) -> Iterator[None]:
  """A run of every fold, or with --fresh, has the workdir to itself. Runs that name their
  folds (cv.folds) share it, each holding its own folds, so that jobs train other folds of
  one workdir at the same time; their shared files are written under `_writes_lock`."""
  lock = workdir / f"run.lock.{jax.process_index()}"
  if fresh or not config.cv.folds:
    with io_utils.file_lock(lock, f"workdir {workdir}"):
      yield
    return
  with contextlib.ExitStack() as locks:
    locks.enter_context(io_utils.file_lock(lock, f"workdir {workdir}", shared=True))
    for fold in config.cv.folds:
      fold_lock = lock.with_name(f"{lock.name}.fold_{fold}")
      locks.enter_context(io_utils.file_lock(fold_lock, f"fold {fold} of workdir {workdir}"))
    yield


def _writes_lock(workdir: pathlib.Path):
  """Held while the writing process writes a file that runs of other folds write too:
  config.json, metrics.jsonl, and the results of every finished fold."""
  return io_utils.file_lock(workdir / "run.lock.writes", f"workdir {workdir}", wait=True)


def _empty_workdir(workdir: pathlib.Path) -> None:
  """Deletes what the workdir holds except its lock files (held: this process's, and any
  other process's of the same run, which must keep excluding a second run)."""
  for path in workdir.iterdir():
    if path.name.startswith("run.lock."):
      continue
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    else:
      path.unlink()


def _run(config, workdir: pathlib.Path, is_writer: bool) -> run_results.RunResults:
  start_time = time.time()
  topology = Topology.create()
  topology.check_batch_size("train.batch_size", config.train.batch_size)
  settings = Settings.from_config(config, topology)
  run, kept, fold_indices = _prepare(config, settings, topology, workdir, is_writer)
  if is_writer:
    # Only now, with the corpus read and its folds made: a config refused on the way (a
    # wrong root, an unknown class) leaves nothing its corrected rerun would be refused by.
    # Checked again: a run of other folds may have written it since.
    with _writes_lock(workdir):
      check_same_config(config, workdir)
      write_config(config, workdir)
  folds = {k: make_fold(run, k, *fold_indices[k]) for k in data.trained_folds(config, fold_indices)}
  trains = not set(folds) <= set(layout.finished_folds(workdir))
  trained_results = _train_and_test(run, folds)
  with _writes_lock(workdir) if is_writer else contextlib.nullcontext():
    # Folds that another invocation finished (with cv.folds naming others) are reported too.
    fold_results = trained_results + [
      result
      for k in range(len(fold_indices))
      if k not in folds and (result := _finished_fold(run, k)) is not None
    ]
    fold_results.sort(key=lambda result: result["fold"])
    run_summary = _summarise(
      run, kept, fold_indices, fold_results, _wall_seconds(workdir, start_time, trains)
    )
    if is_writer:
      results.write_results(workdir, run_summary)
      results.write_predictions(
        workdir / layout.PREDICTIONS,
        run.store.class_names,
        [layout.fold_dir(workdir, r["fold"]) / layout.PREDICTIONS for r in fold_results],
      )
      plots.write_figures(workdir, run_summary, run.log.read())
      logging.info("%s", results.final_line(run_summary))
  return run_summary


def _prepare(config, settings: Settings, topology: Topology, workdir, is_writer: bool):
  """(the Run, its kept utterances, its folds' (train, test) indices).

  The programs compile in a thread while the features are extracted, for the shapes of
  the corpus's listing, which the store's equal unless files are skipped.
  """
  members = tuple(members_of(config))
  corpus = data.load_corpus(config)
  data.check_fold_sizes(corpus, config)
  test_corpus = (
    data.load_corpus(data.config_for_test_corpus(config)) if config.data.test_corpus else None
  )
  params = FeatureParams.from_config(config.features)
  feature_shape = (params.n_bins, params.n_frames)
  n_rows = memory.rows_on_device(settings.on_device, len(corpus.utterances), feature_shape)

  def folds_and_shapes(listing: data.Listing, test_size: int | None):
    kept, folds = data.run_folds(config, listing, test_size)
    trained = data.trained_folds(config, folds)
    n_classes = len(listing.class_names)
    shapes = program_shapes(settings, members, folds, trained, feature_shape, n_rows, n_classes)
    return kept, folds, trained, shapes

  listing = data.Listing.of_corpus(corpus)
  _, _, trained, expected = folds_and_shapes(
    listing, len(test_corpus.utterances) if test_corpus else None
  )
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
    engine = pool.submit(build_engine, config, settings, members, expected, trained, topology)
    store = data.prepare_store(config, corpus=corpus)
    data.log_store(store)
    test_store = store
    if test_corpus:
      test_store = data.prepare_store(data.config_for_test_corpus(config), corpus=test_corpus)
      data.log_store(test_store)
    engine = engine.result()
  kept, fold_indices, trained, shapes = folds_and_shapes(
    data.Listing.of_store(store), len(test_store) if test_corpus else None
  )
  if shapes != engine.shapes:
    logging.info("Files were skipped: the programs are compiled again for the store's folds")
    engine = build_engine(config, settings, members, shapes, trained, topology)
  device_rows = None
  if n_rows is not None:
    device_rows = jax.device_put(data.padded_rows(store, n_rows), topology.replicated)
    logging.info("Features on the device: %s", memory.describe_bytes(data.rows_bytes(store)))
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
    log=results.MetricsLog(
      workdir / layout.METRICS, functools.partial(_writes_lock, workdir), enabled=is_writer
    ),
    is_writer=is_writer,
  )
  return run, kept, fold_indices


def _train_and_test(run: Run, folds: dict[int, Fold]) -> list[dict]:
  """Each fold's result: an earlier run's where that fold finished; else its cells are
  trained (program by program), tested and written, and the fold's result made of them."""
  engine = run.engine
  fold_results = {k: _finished_fold(run, k) for k in folds}
  # Results of the cells tested here, kept in memory: only the writing process writes them,
  # and another process must not wait for its files.
  tested: dict[tuple[int, range], dict] = {}
  for group in engine.groups:
    cells = [Cell(folds[k], chunk) for k, chunk in group if fold_results[k] is None]
    if cells:
      trained = train_cells(run, cells)
      for cell, state in cell_states(run, cells, trained):
        if run.cell_result(cell) is None:
          made = engine.programs_for(cells)
          tested[cell.fold.index, cell.members] = evaluate_cell(run, made, cell, state)
    for k, _ in group:
      chunks = [chunk for _, chunk in _cells_of(engine, k)]
      cell_results = [tested.get((k, c)) or run.cell_result(Cell(folds[k], c)) for c in chunks]
      if fold_results[k] is None and all(cell_results):
        fold_results[k] = finish_fold(run, folds[k], chunks, cell_results)
  return [fold_results[k] for k in folds]


def _wall_seconds(workdir: pathlib.Path, start_time: float, trained: bool) -> float:
  """The seconds of every invocation that trained folds of this run, summed: the stored
  figure plus this one's (none, where it trained nothing)."""
  try:
    previous = json.loads((workdir / layout.RESULTS).read_text())["wall_seconds"]
  except (OSError, ValueError, KeyError):
    previous = None
  if previous is None:
    return time.time() - start_time
  return previous + (time.time() - start_time if trained else 0.0)


def _summarise(
  run: Run, kept, fold_indices, fold_results, wall_seconds: float
) -> run_results.RunResults:
  """results.json's contents."""
  config, store, test_store = run.config, run.store, run.test_store
  test_corpus = bool(config.data.test_corpus)
  given = config.cv.scheme == "given" and not test_corpus
  return results.summarise_run(
    config=config,
    class_names=store.class_names,
    members=[m.as_dict() for m in run.members],
    fold_results=fold_results,
    num_params=run.engine.num_params,
    feature_store=str(store.path),
    skipped=data.skipped_files(store),
    class_counts={
      "corpus": data.class_counts(store, np.arange(len(store))),
      "used": data.class_counts(store, kept),
      **({"test": data.class_counts(test_store, fold_indices[0][1])} if test_corpus else {}),
    },
    given_folds=(
      [
        {"name": f.name, "n_valid": len(f.valid)}
        for f in data.given_folds(data.Listing.of_store(store), kept)
      ]
      if given
      else None
    ),
    provenance=results.provenance(
      {
        **run.engine.backend.provenance(),
        "deterministic": bool(config.train.deterministic),
        "xla_options": run.settings.options.compiler_options,
        "features_on_device": run.device_rows is not None,
        "models_together": run.settings.models_together,
      }
    ),
    wall_seconds=wall_seconds,
    n_folds=len(fold_indices),
  )


def _cells_of(engine: Engine, fold: int) -> list[tuple[int, range]]:
  return [cell for group in engine.groups for cell in group if cell[0] == fold]


def make_fold(run: Run, index: int, train_idx: np.ndarray, test_idx: np.ndarray) -> Fold:
  """The fold with its normalisation, from its training utterances only (saved)."""
  store = run.store
  mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
  if run.is_writer and not (layout.fold_dir(run.workdir, index) / layout.FOLD_RESULT).exists():
    layout.fold_dir(run.workdir, index).mkdir(parents=True, exist_ok=True)
    results.save_normalisation(
      layout.fold_dir(run.workdir, index) / layout.NORMALISATION, mean, std
    )
  return Fold(index, train_idx, test_idx, mean, std)


def _finished_fold(run: Run, index: int) -> dict | None:
  path = layout.fold_dir(run.workdir, index) / layout.FOLD_RESULT
  if not path.exists():
    return None
  logging.info("Fold %d already finished; keeping its result (%s)", index, path)
  return json.loads(path.read_text())


def finish_fold(run: Run, fold: Fold, chunks: list[range], cell_results: list[dict]) -> dict:
  """The fold's result from its cells' (one per member chunk), written to its folder."""
  counts = [member for result in cell_results for member in result["confusion_counts"]]
  fold_dir = layout.fold_dir(run.workdir, fold.index)
  if run.is_writer and len(chunks) > 1:
    results.write_predictions(
      fold_dir / layout.PREDICTIONS,
      run.store.class_names,
      [run.cell_dir(Cell(fold, chunk)) / layout.PREDICTIONS for chunk in chunks],
    )
  return results.save_fold_result(
    fold_dir / layout.FOLD_RESULT, fold.index, fold.train_idx, fold.test_idx, counts, run.is_writer
  )


def evaluate_cell(run: Run, made, cell: Cell, state) -> dict:
  """Tests a cell's trained members on its fold; writes its predictions and result.json, and
  returns the result."""
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
  cell_result = results.save_fold_result(
    run_dir / layout.FOLD_RESULT, fold.index, fold.train_idx, fold.test_idx, counts, run.is_writer
  )
  for k, j in enumerate(cell.members):
    logging.info(
      "Fold %d%s: WA %.2f  UA %.2f  macro-F1 %.2f  (train %d, test %d)",
      fold.index,
      f" member {j} {run.members[j]}" if len(run.members) > 1 else "",
      metrics.wa(counts[k]),
      metrics.ua(counts[k]),
      metrics.macro_f1(counts[k]),
      len(fold.train_idx),
      len(fold.test_idx),
    )
  return cell_result


def write_config(config, workdir: pathlib.Path) -> None:
  """The run's config.json, which a rerun is checked against."""
  io_utils.atomic_write_json(workdir / layout.CONFIG, json.loads(config.to_json_best_effort()))


def check_same_config(
  config, workdir: pathlib.Path, remedy: str = "use another --workdir, or --fresh to discard it"
) -> None:
  """config.json holds the whole config; a rerun must match it up to RESULT_NEUTRAL_KEYS."""
  path = workdir / layout.CONFIG
  if not path.exists():
    return
  previous = json.loads(path.read_text())
  current = json.loads(config.to_json_best_effort())
  changed = config_tree.diff(previous, current, ignore=RESULT_NEUTRAL_KEYS)
  if changed:
    raise ConfigMismatchError(
      f"workdir {workdir} holds a run with a different config (changed: "
      f"{', '.join(changed)}); {remedy}"
    )
