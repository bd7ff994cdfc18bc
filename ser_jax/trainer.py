"""Training a run's (fold, members) cells: one program trains a group of cells' models
together, epoch after epoch, each cell from its latest checkpoint, checkpointed in its own
folder and logged to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ser_jax import checkpoints, input_pipeline, layout, results
from ser_jax.engine import Engine, Member, Settings, stacked_hparams
from ser_jax.sharding import Topology
from ser_jax.store import FeatureStore


class NonFiniteLossError(FloatingPointError):
  """A NaN or inf training loss; the last good checkpoint is kept."""


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

  def cell_result(self, cell: Cell) -> dict | None:
    """The cell's result.json, once it is trained and tested; else None."""
    path = self.cell_dir(cell) / layout.FOLD_RESULT
    return json.loads(path.read_text()) if path.exists() else None


def _concatenate(trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def train_cells(run: Run, cells: list[Cell]):
  """Trains the cells' models together in one program, each from its latest checkpoint
  (cells already finished stay masked); returns the stacked trained state."""
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
    if run.cell_result(cell) is not None:  # Finished; its models stay masked.
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
      state = made.put_cell(state, restored, first)
    # Records past the checkpoint (every record, without one) are of a killed run's epochs,
    # which train again: dropped from metrics.jsonl, and hidden from TensorBoard.
    run.log.truncate(cell.fold.index, start_epoch, cell.members.start)
    epochs.append(start_epoch)
    writers.append(
      results.TensorBoard(
        layout.tensorboard_dir(run.workdir, cell.fold.index, cell.members, len(run.members)),
        enabled=run.is_writer,
        purge_step=start_epoch * n + 1,
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
        members = run.members[cell.members.start : cell.members.stop]
        writers[i].scalars(record, members, cell.members.start)
        epochs[i] += 1
        if epochs[i] % settings.checkpoint_every_epochs == 0 or epochs[i] == settings.num_epochs:
          checkpoints.save(managers[i], epochs[i], made.take_cell(state, first))
      progress.update(min(epochs) - progress.n)
  finally:
    # Whatever stops training, the checkpoints already started are committed.
    progress.close()
    for manager in managers:
      manager.wait_until_finished()
      manager.close()
    for writer in writers:
      if writer is not None:
        writer.close()
  return state


def cell_states(run: Run, cells: list[Cell], state):
  """(cell, its members' state) for each of `cells`, from the state that trained them."""
  made = run.engine.programs_for(cells)
  for i, cell in enumerate(cells):
    yield cell, made.take_cell(state, i * len(cell.members))


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
    folder = run.cell_dir(cell) / "checkpoints"
    saved = epoch >= run.settings.checkpoint_every_epochs  # A checkpoint's epoch came before.
    raise NonFiniteLossError(
      f"non-finite training loss ({losses_[bad_step, bad_member]}) in fold {cell.fold.index}, "
      f"epoch {epoch + 1}, step {epoch * n_steps + bad_step + 1}, member "
      f"{run.members[cell.members.start + bad_member]}; "
      + (
        f"the last good checkpoint is kept in {folder}" if saved else "before its first checkpoint"
      )
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
