"""What a run writes: metrics.jsonl, TensorBoard scalars, results.json and results.md."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

import numpy as np

from ser_jax import io_utils, layout, plots, render, run_results


class MetricsLog:
  """Per-epoch records in `metrics.jsonl`; a resumed fold drops records after its checkpoint.

  `lock()` is held while the file is written, which runs of other folds write too.
  """

  def __init__(
    self,
    path: pathlib.Path,
    lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    enabled: bool = True,
  ):
    self.path = path
    self.lock = lock
    self.enabled = enabled

  def append(self, record: dict) -> None:
    if self.enabled:
      with self.lock(), open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def truncate(self, fold: int, epoch: int, first_member: int = 0) -> None:
    if not self.enabled:
      return
    with self.lock():
      if not self.path.exists():
        return
      lines = self.path.read_text().splitlines()
      kept = []
      for line in lines:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a kill.
          continue
        same_run = record["fold"] == fold and record.get("first_member", 0) == first_member
        if not (same_run and record["epoch"] > epoch):
          kept.append(line)
      if len(kept) < len(lines):  # Every fold's start calls this; most drop nothing.
        io_utils.atomic_write_text(self.path, "".join(k + "\n" for k in kept))

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    records = []
    for line in self.path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
    return records


def member_tag(index: int, member) -> str:
  """A sweep member's TensorBoard tag: its index, gamma, seed, learning rate and weights,
  in the characters tensorboardX keeps in a tag (it writes others as '_')."""
  alpha = member.alpha
  weights = alpha if isinstance(alpha, str) else "-".join(f"{a:g}" for a in alpha)
  tag = f"member_{index}_gamma_{member.gamma:g}_seed_{member.seed}_lr_{member.learning_rate:g}"
  return f"{tag}_alpha_{weights}" if weights else tag


class TensorBoard:
  """Per fold (and per member of a sweep), each epoch's train loss, train accuracy and
  learning rate (metrics.jsonl's) as TensorBoard scalars."""

  def __init__(self, logdir: pathlib.Path, enabled: bool = True, purge_step: int | None = None):
    """`purge_step`: TensorBoard hides the scalars of earlier files from this step on (those
    of a killed run's epochs past its checkpoint).

    Written in this thread, each epoch on disk before its checkpoint is saved:
    tensorboardX's SummaryWriter queues events for a thread of its own, and its flush does
    not wait for them, so a kill could keep a checkpoint whose epoch TensorBoard lacks.
    """
    self.writer = None
    if enabled:
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto.event_pb2 import Event, SessionLog

      logdir.mkdir(parents=True, exist_ok=True)
      self.writer = EventsWriter(str(logdir / "events"), filename_suffix=f".{os.getpid()}")
      if purge_step is not None:
        start = SessionLog(status=SessionLog.START)
        self.writer.write_event(Event(wall_time=time.time(), step=purge_step, session_log=start))
      self.writer.flush()

  def scalars(self, record: dict, members, first_member: int = 0) -> None:
    """The record of `members` (a chunk of the run's, from its member `first_member`)."""
    if self.writer is None:
      return
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    for k, member in enumerate(members):
      suffix = "" if len(members) == 1 else f"/{member_tag(first_member + k, member)}"
      for name in ("train_loss", "train_accuracy", "learning_rate"):
        summary = scalar(f"{name}{suffix}", float(record[name][k]))
        self.writer.write_event(Event(wall_time=time.time(), step=record["step"], summary=summary))
    self.writer.flush()  # And fsync.

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def save_normalisation(path: pathlib.Path, mean: np.ndarray, std: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, mean=mean, std=std)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def summarise_run(
  *,
  config,
  class_names,
  members,
  fold_results,
  num_params,
  feature_store,
  skipped,
  class_counts,
  provenance,
  wall_seconds,
  n_folds=None,
  given_folds=None,
) -> run_results.RunResults:
  """The run's results from its folds' (fold, n_train, n_test, confusion_counts [members]).

  members: each member's hyper-parameters (gamma, seed, learning_rate, alpha).
  given_folds: per fold of the corpus's own (cv.scheme='given'), its name and the number of
  utterances of its valid split (kept out of training, not used); None for made folds.
  """

  def fold_of(result: dict, k: int) -> run_results.FoldResults:
    given = None if given_folds is None else run_results.GivenFold(**given_folds[result["fold"]])
    return run_results.FoldResults(
      fold=result["fold"],
      n_train=result["n_train"],
      n_test=result["n_test"],
      confusion_counts=result["confusion_counts"][k],
      given_fold=given,
    )

  return run_results.RunResults(
    class_names=class_names,
    members=[
      run_results.MemberResults(**member, folds=[fold_of(r, k) for r in fold_results])
      for k, member in enumerate(members)
    ],
    config=json.loads(config.to_json_best_effort()),
    num_params=num_params,
    feature_store=feature_store,
    skipped_files=skipped,
    class_counts=class_counts,
    provenance=provenance,
    wall_seconds=wall_seconds,
    n_folds=n_folds,
  )


def provenance(backend_provenance: dict) -> dict:
  """What produced a run: package versions, devices, and the backend's account of how it
  computed (ser_jax.cpu.Backend.provenance: the lowering, the CPU, ...)."""
  import jax

  devices = jax.devices()
  return {
    **{name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
    "ser_jax": _version("ser_jax"),
    **backend_provenance,
    "device": devices[0].device_kind,
    "devices": len(devices),
    "processes": jax.process_count(),
    "platform": platform.platform(),
  }


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


PREDICTION_COLUMNS = ("utt_id", "speaker", "fold", "member", "label", "predicted")


def save_fold_predictions(path, store, fold: int, test_idx, first_member: int, probabilities):
  """A fold's predictions.csv: one row per test utterance and member (probabilities
  [members, n_test, n_classes]), class columns p_<class>."""
  names = store.class_names
  rows = []
  for k, member_probabilities in enumerate(probabilities):
    for index, p in zip(test_idx, member_probabilities, strict=True):
      row = store.manifest[index]
      rows.append(
        [
          row["utt_id"],
          row["speaker"],
          fold,
          first_member + k,
          names[store.labels[index]],
          names[int(np.argmax(p))],
          *(f"{float(v):.9g}" for v in p),
        ]
      )
  io_utils.atomic_write_csv(path, prediction_header(names), rows)


def save_fold_result(path, fold: int, train_idx, test_idx, counts, is_writer: bool) -> dict:
  """What a finished fold (or cell of members) keeps: its size and confusion counts
  [members][n_classes][n_classes]."""
  fold_result = {
    "fold": fold,
    "n_train": int(len(train_idx)),
    "n_test": int(len(test_idx)),
    "confusion_counts": counts,
  }
  if is_writer:
    io_utils.atomic_write_json(path, fold_result)
  return fold_result


def prediction_header(class_names) -> list[str]:
  return [*PREDICTION_COLUMNS, *(f"p_{name}" for name in class_names)]


def write_predictions(path, class_names, parts) -> None:
  """One predictions.csv from the parts (per fold, or per chunk of members), rows ordered by
  fold, member, then test order."""
  rows = []
  for part in parts:
    with open(part, newline="") as f:
      reader = csv.reader(f)
      header = next(reader)
      if header != prediction_header(class_names):
        raise ValueError(f"{part}: unexpected columns {header}")
      rows.extend(reader)
  rows.sort(key=lambda row: (int(row[2]), int(row[3])))  # Stable: test order kept.
  io_utils.atomic_write_csv(path, prediction_header(class_names), rows)


def final_line(results: run_results.RunResults) -> str:
  model = results.members[0]
  member = f" of member 0 ({plots.member_label(model)})" if results.is_sweep else ""
  return (
    f"Result{member} over {results.folds_label} folds: WA {model.wa_fold_mean:.2f} "
    f"+/- {model.wa_fold_std:.2f}, UA {model.ua_fold_mean:.2f} "
    f"+/- {model.ua_fold_std:.2f}, macro-F1 {model.macro_f1_fold_mean:.2f}"
  )


_SCORES = ("wa", "ua", "macro_f1")


def _plus_minus(member: run_results.MemberResults, name: str) -> str:
  return f"{getattr(member, f'{name}_fold_mean'):.2f} +/- {getattr(member, f'{name}_fold_std'):.2f}"


def results_markdown(results: run_results.RunResults) -> str:
  """Table 1's shape (WA, UA) and Tables 2-3's shape (row-normalised confusion, %)."""
  config = results.config
  model = results.members[0]
  kind = plots.input_label(config)
  # Member 0's loss, whose scores the table gives (a sweep's first gamma, not loss.gamma).
  loss_label = plots.member_label(model)  # As report.py's tables and the figures say it.
  if results.is_sweep:
    loss_label += f" (member 0 of {len(results.members)}: every member below)"
  names = results.class_names
  corpus = config["data"]["corpus"]
  if corpus == "emobox":
    corpus = f"EmoBox {pathlib.Path(config['data']['root']).name}"
  n_folds = results.n_folds or len(model.folds)
  finished = ""
  if len(model.folds) < n_folds:
    finished = f" (finished: fold {', '.join(str(f.fold) for f in model.folds)})"
  lines = [
    f"# {corpus}: {kind}, {loss_label}, {n_folds}-fold {config['cv']['scheme']} "
    f"cross-validation{finished}",
    "",
    *render.markdown_table(
      ("Input", "Loss", "Overall accuracy (WA)", "Class accuracy (UA)", "Macro F1"),
      [[kind, loss_label, *(_plus_minus(model, k) for k in _SCORES)]],
    ),
    "",
    "Confusion matrix (rows: true class, % of the row; summed over folds)",
    "",
    *render.markdown_table(
      ("true \\ predicted", *names),
      [
        [name, *(f"{v:.1f}" for v in row)]
        for name, row in zip(names, model.confusion_matrix_pooled, strict=True)
      ],
    ),
  ]
  lines += _emobox_markdown(model)
  given = model.folds[0].given_fold is not None
  fold_rows = []
  for fold in model.folds:
    cells = [fold.fold]
    if given:
      cells += [fold.given_fold.name, fold.given_fold.n_valid]
    cells += [fold.n_train, fold.n_test]
    cells += [f"{getattr(fold, k):.2f}" for k in _SCORES]
    fold_rows.append(cells)
  lines += [
    "",
    *render.markdown_table(
      ("Fold", *(("Given fold", "Valid (not used)") if given else ()), "Train", "Test")
      + ("WA", "UA", "Macro F1"),
      fold_rows,
    ),
  ]
  if results.is_sweep:
    lines += [
      "",
      "Sweep (mean +/- std over folds)",
      "",
      *render.markdown_table(
        ("gamma", "seed", "learning rate", "class weights", "WA", "UA", "Macro F1"),
        [
          [
            m.gamma,
            m.seed,
            m.learning_rate,
            plots.alpha_label(m.alpha),
            *(_plus_minus(m, k) for k in _SCORES),
          ]
          for m in results.members
        ],
      ),
    ]
  if results.skipped_files:
    lines += [
      "",
      f"{len(results.skipped_files)} files skipped; see skipped_files in results.json",
    ]
  return "\n".join(lines) + "\n"


def _emobox_markdown(model: run_results.MemberResults) -> list[str]:
  """EmoBox's scores (scikit-learn's, %): the mean over folds, as its leaderboard gives
  them, and once over every test prediction pooled. EmoBox's micro F1 is WA (one label per
  utterance), so its column repeats WA, labelled so."""
  names = {"wa": "WA", "ua": "UA", "micro_f1": "Micro F1 (= WA)", "macro_f1": "Macro F1"}
  scores = {"micro_f1": "wa"}
  return [
    "",
    "EmoBox's scores (scikit-learn's accuracy, balanced accuracy, micro and macro F1, %)",
    "",
    *render.markdown_table(
      ("", *names.values()),
      [
        [f"mean +/- sd over {len(model.folds)} folds (`<score>_fold_mean`)"]
        + [_plus_minus(model, scores.get(k, k)) for k in names],
        [f"pooled over all {model.n_test_pooled} test predictions (`<score>_pooled`)"]
        + [f"{getattr(model, f'{scores.get(k, k)}_pooled'):.2f}" for k in names],
      ],
    ),
  ]


def write_results(workdir: pathlib.Path, results: run_results.RunResults) -> None:
  """results.json (ser_jax.run_results) and results.md."""
  run_results.write(workdir, results)
  io_utils.atomic_write_text(workdir / layout.RESULTS_MD, results_markdown(results))
