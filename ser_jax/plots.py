"""Figures of a run: confusion matrix, learning curves and the focal-loss gamma sweep.

Figures are drawn on matplotlib's Agg canvas without pyplot, so plotting never touches a
global backend or an interactive session. matplotlib is imported when a figure is drawn, so
that a process that draws none does not pay for it.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ser_jax import io_utils, run_results

if TYPE_CHECKING:
  from matplotlib.figure import Figure

_KINDS = {"mfcc": "MFCC", "logmel": "Log-mel"}


def input_label(config: dict) -> str:
  """'MFCC' or 'Log-mel' for a run's config (as stored in results.json)."""
  kind = config["features"]["kind"]
  if kind not in _KINDS:
    raise ValueError(f"features.kind={kind!r} is not one of {', '.join(_KINDS)}")
  return _KINDS[kind]


def loss_label(gamma: float) -> str:
  """'Focal (gamma=2)', or 'Softmax' for gamma 0, where the focal loss is the softmax loss."""
  return f"Focal (gamma={gamma:g})" if gamma else "Softmax"


def alpha_label(alpha: tuple[float, ...] | str) -> str:
  """A member's class weights: 'no class weights', 'inverse_frequency weights', or them."""
  if isinstance(alpha, str):
    return f"{alpha} weights"
  return f"class weights {', '.join(f'{a:g}' for a in alpha)}" if alpha else "no class weights"


def member_label(member: run_results.MemberResults) -> str:
  """Its loss (see loss_label), and its class weights where it has them."""
  label = loss_label(member.gamma)
  return f"{label}, {alpha_label(member.alpha)}" if member.alpha else label


def _new_figure(width: float, height: float) -> Figure:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _save(figure: Figure, path: str | os.PathLike) -> None:
  """Writes a PNG atomically: a reader sees the old figure or the new one, never half of one."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(results: run_results.RunResults, path: str | os.PathLike) -> None:
  """Member 0's row-normalised confusion matrix (%), as in the paper's Tables 2 and 3."""
  names = results.class_names
  model = results.members[0]
  matrix = model.confusion_matrix_pooled
  size = 1.2 + 0.9 * len(names)
  figure = _new_figure(size + 1.2, size)
  axes = figure.add_subplot()
  image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=100.0)
  for (row, col), value in np.ndenumerate(matrix):
    # White text on the dark cells keeps every annotation readable.
    colour = "white" if value > 60 else "black"
    axes.text(col, row, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=9)
  axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
  axes.set_yticks(range(len(names)), names)
  axes.set_xlabel("Predicted")
  axes.set_ylabel("True")
  figure.colorbar(image, ax=axes, label="% of true class (summed over folds)")
  member = f"{member_label(model)}{' (member 0)' if results.is_sweep else ''}"
  axes.set_title(
    f"{input_label(results.config)}, {member}\n"
    f"WA {model.wa_fold_mean:.2f}% +/- {model.wa_fold_std:.2f}, "
    f"UA {model.ua_fold_mean:.2f}% +/- {model.ua_fold_std:.2f}\n"
    f"(mean +/- sd over {results.folds_label} folds)",
    fontsize=10,
  )
  _save(figure, path)


def learning_curve_points(records: Sequence[dict], member: int = 0) -> dict[int, dict]:
  """{fold: {epoch: {train_loss, train_accuracy}}} of sweep member `member`.

  A sweep trained in chunks logs each chunk's members with its `first_member`; the record
  of the chunk holding `member` counts. A resumed fold may repeat an epoch; the later
  record counts.
  """
  by_fold: dict[int, dict[int, dict]] = collections.defaultdict(dict)
  for record in records:
    first = record.get("first_member", 0)
    if first <= member < first + len(record["train_loss"]):
      by_fold[record["fold"]][record["epoch"]] = {
        key: record[key][member - first] for key in ("train_loss", "train_accuracy")
      }
  return dict(by_fold)


def plot_learning_curves(
  records: Sequence[dict], path: str | os.PathLike, member: int = 0, title: str = ""
) -> None:
  """Train loss and train accuracy per epoch, one line per fold (of sweep member `member`),
  under `title` (the run's name)."""
  from matplotlib.ticker import MaxNLocator

  if not records:
    raise ValueError("no metrics records to plot (metrics.jsonl is empty or missing)")
  by_fold = learning_curve_points(records, member)
  if not by_fold:
    raise ValueError(f"no metrics records of sweep member {member}")
  figure = _new_figure(10, 4)
  loss_axes, accuracy_axes = figure.subplots(1, 2)
  for fold in sorted(by_fold):
    epochs = sorted(by_fold[fold])
    for axes, key in ((loss_axes, "train_loss"), (accuracy_axes, "train_accuracy")):
      values = [by_fold[fold][e][key] for e in epochs]
      axes.plot(epochs, values, marker="o", markersize=3, label=f"fold {fold}")
  loss_axes.set_ylabel("Train loss")
  accuracy_axes.set_ylabel("Train accuracy (%)")
  for axes in (loss_axes, accuracy_axes):
    axes.set_xlabel("Epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
  accuracy_axes.legend(fontsize=8, ncols=2)
  n_members = max(r.get("first_member", 0) + len(r["train_loss"]) for r in records)
  of_member = f" (sweep member {member} of {n_members})" if n_members > 1 else ""
  figure.suptitle(f"{title}{': ' if title else ''}training per fold{of_member}", fontsize=10)
  _save(figure, path)


SWEEP_SCORES = ("wa", "ua", "macro_f1")


def sweep_points(
  members: Sequence[run_results.MemberResults],
) -> dict[tuple[float, tuple[float, ...] | str], dict[str, np.ndarray]]:
  """Per curve, (learning rate, class weights alpha): gammas and seed-averaged means and
  stds of `SWEEP_SCORES` over folds (keys `<score>_fold_mean`, `<score>_fold_std`), sorted
  by gamma.

  The std pools seeds and folds (mean of the fold variances plus the variance of the seed
  means), which is the spread over every (seed, fold) model when folds are equally many.
  """
  groups: dict[tuple, list] = collections.defaultdict(list)
  for member in members:
    groups[(member.learning_rate, member.alpha), member.gamma].append(member)
  points: dict[tuple, dict[str, list]] = collections.defaultdict(
    lambda: collections.defaultdict(list)
  )
  for (curve, gamma), group in sorted(groups.items(), key=lambda item: _curve_order(*item[0])):
    points[curve]["gamma"].append(gamma)
    for name in SWEEP_SCORES:
      means = np.array([getattr(m, f"{name}_fold_mean") for m in group])
      stds = np.array([getattr(m, f"{name}_fold_std") for m in group])
      points[curve][f"{name}_fold_mean"].append(means.mean())
      points[curve][f"{name}_fold_std"].append(np.sqrt(np.mean(stds**2) + means.var()))
  return {
    curve: {key: np.array(values) for key, values in columns.items()}
    for curve, columns in points.items()
  }


def _curve_order(curve: tuple, gamma: float) -> tuple:
  """Learning rate, then class weights (none, given, by rule), then gamma."""
  rate, alpha = curve
  return rate, isinstance(alpha, str), str(alpha), gamma


def curve_label(curve: tuple, curves) -> str | None:
  """The curve's learning rate and class weights, where the sweep's curves differ in them."""
  rate, alpha = curve
  parts = []
  if len({r for r, _ in curves}) > 1:
    parts.append(f"lr {rate:g}")
  if len({a for _, a in curves}) > 1:
    parts.append(alpha_label(alpha))
  return ", ".join(parts) or None


def plot_sweep(results: run_results.RunResults, path: str | os.PathLike) -> None:
  """WA and UA (mean +/- std over folds and seeds) against gamma; gamma 0 is softmax."""
  if not results.is_sweep:
    raise ValueError("the run has one member, not a sweep to plot")
  points = sweep_points(results.members)
  figure = _new_figure(10, 4)
  panels = figure.subplots(1, 2, sharey=True)
  names = (("wa", "Overall accuracy (WA, %)"), ("ua", "Class accuracy (UA, %)"))
  for axes, (name, title) in zip(panels, names, strict=True):
    for curve, columns in points.items():
      axes.errorbar(
        columns["gamma"],
        columns[f"{name}_fold_mean"],
        yerr=columns[f"{name}_fold_std"],
        marker="o",
        capsize=3,
        label=curve_label(curve, points),
      )
    gammas = sorted({g for columns in points.values() for g in columns["gamma"]})
    axes.set_xticks(gammas, [f"{g:g}" + ("\n(softmax)" if g == 0 else "") for g in gammas])
    axes.set_xlabel("Focal loss gamma")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if len(points) > 1:
      axes.legend(fontsize=8)
  n_seeds = len({member.seed for member in results.members})
  seeds = f"mean of {n_seeds} seeds" if n_seeds > 1 else "one seed"
  figure.suptitle(f"{input_label(results.config)}: gamma sweep, {seeds}", fontsize=10)
  _save(figure, path)


def write_figures(
  workdir: str | os.PathLike, results: run_results.RunResults, records: Sequence[dict]
) -> list[pathlib.Path]:
  """Writes confusion.png, learning_curves.png (when there are records) and sweep.png."""
  workdir = pathlib.Path(workdir)
  written = [workdir / "confusion.png"]
  plot_confusion(results, written[-1])
  if records:
    written.append(workdir / "learning_curves.png")
    title = f"{input_label(results.config)}, {member_label(results.members[0])}"
    plot_learning_curves(records, written[-1], title=title)
  if results.is_sweep:
    written.append(workdir / "sweep.png")
    plot_sweep(results, written[-1])
  return written


def plot_forest(panels: Sequence[dict], path: str | os.PathLike, xlabel: str) -> None:
  """Writes forest_figure(panels, xlabel)."""
  _save(forest_figure(panels, xlabel), path)


def forest_figure(panels: Sequence[dict], xlabel: str) -> Figure:
  """A forest plot per panel: one row per corpus and a pooled row, difference and interval.

  panels: [{"title": str, "rows": [{"label", "estimate", "low", "high", "pooled": bool,
  "colour"}]}]; pooled rows (last) are drawn as diamonds below a rule; zero is marked. The
  x label is the figure's, under every panel: one under each, wider than a panel beside
  long row labels, ran past the canvas.
  """
  if not panels:
    raise ValueError("no panels to plot")
  n_rows = max(len(panel["rows"]) for panel in panels)
  figure = _new_figure(4.2 * len(panels) + 1.0, 1.2 + 0.45 * n_rows)
  for axes, panel in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True):
    rows = panel["rows"]
    positions = np.arange(len(rows))[::-1]
    for y, row in zip(positions, rows, strict=True):
      low, high = row["low"], row["high"]
      if row.get("pooled"):
        axes.fill(
          [low, row["estimate"], high, row["estimate"]],
          [y, y + 0.25, y, y - 0.25],
          color=row.get("colour", "tab:red"),
        )
      else:
        axes.plot([low, high], [y, y], color="black", linewidth=1.2)
        axes.plot(row["estimate"], y, "s", color="black", markersize=5)
    if any(row.get("pooled") for row in rows):
      first_pooled = next(k for k, row in enumerate(rows) if row.get("pooled"))
      axes.axhline(positions[first_pooled] + 0.5, color="grey", linewidth=0.6)
    axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(positions, [row["label"] for row in rows])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.set_title(panel["title"], fontsize=10)
    axes.grid(axis="x", alpha=0.3)
  figure.supxlabel(xlabel, fontsize=10)
  return figure


def plot_cross_corpus(matrices: Sequence[dict], path: str | os.PathLike) -> None:
  """Writes cross_corpus_figure(matrices)."""
  _save(cross_corpus_figure(matrices), path)


def cross_corpus_figure(matrices: Sequence[dict]) -> Figure:
  """One heat map per setting of UA (%) by training corpus (rows) and test corpus (columns).

  matrices: [{"title": str, "corpora": [names], "ua": [[float or None]]}]; None cells (failed
  runs) are left blank.
  """
  if not matrices:
    raise ValueError("no matrices to plot")
  n = max(len(m["corpora"]) for m in matrices)
  size = 1.5 + 0.9 * n
  figure = _new_figure(size * len(matrices) + 1.2, size)
  panels = np.atleast_1d(figure.subplots(1, len(matrices)))
  image = None
  for axes, matrix in zip(panels, matrices, strict=True):
    names = matrix["corpora"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["ua"]], float)
    image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=100.0)
    for (row, col), value in np.ndenumerate(values):
      if np.isfinite(value):
        colour = "black" if value > 60 else "white"
        axes.text(col, row, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=9)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("Tested on")
    axes.set_ylabel("Trained on")
    axes.set_title(matrix["title"], fontsize=10)
  figure.colorbar(image, ax=list(panels), label="UA (%); diagonal: within-corpus CV")
  return figure
