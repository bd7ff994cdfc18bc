"""Compares finished runs in the shape of the paper's Table 4: `python -m ser_jax.report RUN...`.

One row per run (per gamma and learning rate for a sweep, seeds averaged), sorted by input
then loss. `--figures` also (re)writes each run's PNG figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from ser_jax import plots, results

_INPUT_ORDER = ("MFCC", "Log-mel")


class ReportError(ValueError):
  """A run directory that cannot be reported."""


def load_summary(run_dir: str | os.PathLike) -> dict:
  """The run's results.json; ReportError names the directory and what is wrong."""
  path = pathlib.Path(run_dir) / "results.json"
  if not path.is_file():
    raise ReportError(f"{path} does not exist (not a run directory, or the run is unfinished)")
  try:
    summary = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise ReportError(f"{path}: unreadable ({error})") from error
  missing = [
    key
    for key in ("class_names", "overall_accuracy", "class_accuracy", "folds", "config")
    if key not in summary
  ]
  if missing:
    raise ReportError(f"{path}: missing keys {', '.join(missing)}")
  return summary


def _mean_std(mean: float, std: float) -> str:
  return f"{mean:.2f} +/- {std:.2f}"


def rows(run: str, summary: dict) -> list[dict]:
  """Table rows of one run: its top-level result, or one per (learning rate, gamma) of a sweep."""
  config = summary["config"]
  common = {
    "input": plots.input_label(config),
    "folds": len(summary["folds"]),
    "corpus": config["data"]["corpus"],
    "run": run,
  }
  if not summary.get("sweep"):
    gamma = plots.effective_gamma(config)
    return [
      {
        **common,
        "gamma": gamma,
        "learning_rate": config["train"]["learning_rate"],
        "loss": plots.loss_label(gamma),
        "wa": _mean_std(summary["overall_accuracy"], summary["overall_accuracy_std"]),
        "ua": _mean_std(summary["class_accuracy"], summary["class_accuracy_std"]),
        "f1": _mean_std(summary["macro_f1"], summary["macro_f1_std"]),
      }
    ]
  points = plots.sweep_points(summary["sweep"])
  out = []
  for rate, columns in points.items():
    for k, gamma in enumerate(columns["gamma"]):
      label = plots.loss_label(float(gamma))
      out.append(
        {
          **common,
          "gamma": float(gamma),
          "learning_rate": rate,
          "loss": f"{label}, lr {rate:g}" if len(points) > 1 else label,
          "wa": _mean_std(columns["overall_accuracy"][k], columns["overall_accuracy_std"][k]),
          "ua": _mean_std(columns["class_accuracy"][k], columns["class_accuracy_std"][k]),
          # results.json keeps macro F1 for the first member only.
          "f1": "-",
        }
      )
  return out


def run_rows(run: str, summary: dict) -> list[dict]:
  """`rows`, with a malformed summary reported as a ReportError naming the run."""
  try:
    return rows(run, summary)
  except KeyError as error:
    raise ReportError(f"{run}/results.json: missing key {error}") from error
  except ValueError as error:
    raise ReportError(f"{run}/results.json: {error}") from error


def markdown_table(table_rows: Sequence[dict]) -> str:
  """Rows sorted by input (MFCC first), then gamma (softmax first), then run."""
  ordered = sorted(
    table_rows,
    key=lambda r: (_INPUT_ORDER.index(r["input"]), r["gamma"], r["learning_rate"], r["run"]),
  )
  lines = [
    "| Input | Loss | WA (%) | UA (%) | Macro F1 (%) | Folds | Corpus | Run |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in ordered:
    lines.append(
      f"| {r['input']} | {r['loss']} | {r['wa']} | {r['ua']} | {r['f1']} | {r['folds']} | "
      f"{r['corpus']} | {r['run']} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m ser_jax.report", description=__doc__.splitlines()[0]
  )
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Workdirs of finished runs.")
  parser.add_argument(
    "--figures", action="store_true", help="(Re)write each run's confusion, curve, sweep PNGs."
  )
  args = parser.parse_args(argv)
  table_rows = []
  for run in args.runs:
    try:
      summary = load_summary(run)
      table_rows.extend(run_rows(run, summary))
    except ReportError as error:
      print(f"error: {error}; skipped", file=sys.stderr)
      continue
    if args.figures:
      records = results.MetricsLog(pathlib.Path(run) / "metrics.jsonl").read()
      written = plots.write_figures(run, summary, records)
      print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
  if not table_rows:
    print("error: no readable run; nothing to report", file=sys.stderr)
    return 1
  print(markdown_table(table_rows), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
