"""Compares finished runs in the shape of the paper's Table 4: `python -m ser_jax.report RUN...`.

One row per run (per gamma and learning rate for a sweep, seeds averaged), sorted by input
then loss. `--figures` also (re)writes each run's PNG figures.

`--compare RUN_A RUN_B` tests the difference B - A on the same test utterances (ser_jax.compare):
WA and UA with 95% bootstrap intervals and p-values, per fold, and the runs' provenance.
`--compare SWEEP_RUN` does so for each sweep setting against gamma 0 of the same seeds.
`--json` adds the numbers as one JSON object on the last line.

`--emobox RUN...` prints EmoBox's intra-corpus leaderboard shape: corpus, folds, UA, WA and
macro F1 (scikit-learn's, mean over folds as EmoBox averages them), and the same pooled over
every test prediction.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from ser_jax import command_line, compare, layout, plots, render, results, run_results

_INPUT_ORDER = ("MFCC", "Log-mel")


class ReportError(ValueError):
  """A run directory that cannot be reported."""


def _mean_std(member: run_results.MemberResults, name: str) -> str:
  return f"{getattr(member, f'{name}_fold_mean'):.2f} +/- {getattr(member, f'{name}_fold_std'):.2f}"


def rows(run: str, results: run_results.RunResults) -> list[dict]:
  """Table rows of one run: its model, or one per (learning rate, class weights, gamma) of a
  sweep, averaged over its seeds."""
  config = results.config
  common = {
    "input": plots.input_label(config),
    "folds": results.folds_label,
    "corpus": corpus_label(config),
    "run": run,
  }
  if not results.is_sweep:
    model = results.members[0]
    return [
      {
        **common,
        "gamma": model.gamma,
        "learning_rate": model.learning_rate,
        "loss": plots.member_label(model),
        "wa": _mean_std(model, "wa"),
        "ua": _mean_std(model, "ua"),
        "f1": _mean_std(model, "macro_f1"),
      }
    ]
  points = plots.sweep_points(results.members)
  out = []
  for curve, columns in points.items():
    rate, _ = curve
    curve_label = plots.curve_label(curve, points)
    for k, gamma in enumerate(columns["gamma"]):
      label = plots.loss_label(float(gamma))
      cells = {
        key: f"{columns[f'{name}_fold_mean'][k]:.2f} +/- {columns[f'{name}_fold_std'][k]:.2f}"
        for key, name in (("wa", "wa"), ("ua", "ua"), ("f1", "macro_f1"))
      }
      out.append(
        {
          **common,
          "gamma": float(gamma),
          "learning_rate": rate,
          "loss": f"{label}, {curve_label}" if curve_label else label,
          **cells,
        }
      )
  return out


def run_rows(run: str, results: run_results.RunResults) -> list[dict]:
  """`rows`, with a malformed config reported as a ReportError naming the run."""
  return _checked(rows, run, results)


def _checked(make_rows, run: str, results: run_results.RunResults):
  """make_rows(run, results), with a malformed config a ReportError naming the run."""
  try:
    return make_rows(run, results)
  except KeyError as error:
    raise ReportError(f"{run}/results.json: config lacks {error}") from error
  except ValueError as error:
    raise ReportError(f"{run}/results.json: {error}") from error


def markdown_table(table_rows: Sequence[dict]) -> str:
  """Rows sorted by input (MFCC first), then gamma (softmax first), learning rate, run."""
  ordered = sorted(
    table_rows,
    key=lambda r: (_INPUT_ORDER.index(r["input"]), r["gamma"], r["learning_rate"], r["run"]),
  )
  columns = ("input", "loss", "wa", "ua", "f1", "folds", "corpus", "run")
  lines = render.markdown_table(
    ("Input", "Loss", "WA (%)", "UA (%)", "Macro F1 (%)", "Folds", "Corpus", "Run"),
    [[r[c] for c in columns] for r in ordered],
  )
  return "\n".join(lines) + "\n"


def corpus_label(config: dict) -> str:
  """The corpus's reader, or for an EmoBox corpus its dataset (e.g. 'emodb')."""
  data = config["data"]
  return pathlib.Path(data["root"]).name if data["corpus"] == "emobox" else data["corpus"]


def emobox_row(run: str, results: run_results.RunResults) -> dict:
  """One leaderboard row: the corpus (an EmoBox corpus by its dataset folder's name), the
  model, the folds and EmoBox's scores (`<score>_fold_mean`, `_fold_std`, `_pooled`); member 0
  of a sweep."""
  config = results.config
  model = results.members[0]
  description = (
    f"{config['model']['name']} (width {config['model']['width']}), "
    f"{plots.input_label(config)}, {plots.member_label(model)}"
    + (" (member 0)" if results.is_sweep else "")
  )
  scores = {
    f"{name}_{over}": getattr(model, f"{name}_{over}")
    for name in ("wa", "ua", "macro_f1")
    for over in ("fold_mean", "fold_std", "pooled")
  }
  folds = f"{results.folds_label} {config['cv']['scheme']}"
  return {
    "corpus": corpus_label(config),
    "model": description,
    "folds": folds,
    "run": run,
    **scores,
  }


def emobox_table(table_rows: Sequence[dict]) -> str:
  """EmoBox's intra-corpus leaderboard shape, rows by corpus then model."""
  scores = [
    f"{name}_{over}" for over in ("fold_mean", "pooled") for name in ("ua", "wa", "macro_f1")
  ]
  lines = render.markdown_table(
    (
      "Corpus",
      "Folds",
      "Model",
      "UA (%)",
      "WA (%)",
      "Macro F1 (%)",
      "Pooled UA",
      "Pooled WA",
      "Pooled macro F1",
      "Run",
    ),
    [
      [r["corpus"], r["folds"], r["model"], *(f"{r[k]:.2f}" for k in scores), r["run"]]
      for r in sorted(table_rows, key=lambda r: (r["corpus"], r["model"], r["run"]))
    ],
  )
  lines += [
    "",
    "UA, WA, macro F1: scikit-learn's balanced accuracy, accuracy and macro F1 of each fold's "
    "test predictions, mean over folds (EmoBox's leaderboard); pooled: once over every test "
    "prediction of the run. EmoBox's micro F1 has no column: with one label per utterance it "
    "equals WA.",
  ]
  return "\n".join(lines) + "\n"


def _signed(value: float) -> str:
  return f"{value:+.2f}"


def _value(value) -> str:
  return "absent" if value is None else str(value)


def comparison_text(result: dict) -> str:
  """The statistics table, how they were computed, and the per-fold table of one comparison."""
  statistics = []
  for name, test in (
    (
      "wa",
      f"exact McNemar (only A right {result['only_a_correct']}, only B right "
      f"{result['only_b_correct']})",
    ),
    ("ua", f"paired permutation, {result['n_resamples']} resamples"),
  ):
    low, high = result[f"{name}_difference_ci95"]
    statistics.append(
      [
        name.upper(),
        f"{result[f'{name}_a']:.2f}",
        f"{result[f'{name}_b']:.2f}",
        _signed(result[f"{name}_difference"]),
        f"[{_signed(low)}, {_signed(high)}]",
        f"{result[f'{name}_p_value']:.3g}",
        test,
      ]
    )
  lines = [
    *render.markdown_table(("", "A (%)", "B (%)", "B - A", "95% CI", "p", "test"), statistics),
    "",
    f"WA and UA pool the test utterances of every fold; CIs: {result['interval_method']}, "
    f"{result['n_resamples']} resamples, seed {result['seed']}.",
    "",
    *render.markdown_table(
      # Pairs: the fold's test utterances (times the seeds, for a sweep's members).
      ("Fold", "Pairs", "WA A", "WA B", "WA B - A", "UA A", "UA B", "UA B - A"),
      [_fold_cells(fold) for fold in result["per_fold"]],
    ),
  ]
  return "\n".join(lines) + "\n"


def _fold_cells(fold: dict) -> list:
  cells = [fold["fold"], fold["n_test"]]
  for name in ("wa", "ua"):
    cells += [f"{fold[f'{name}_a']:.2f}", f"{fold[f'{name}_b']:.2f}"]
    cells.append(_signed(fold[f"{name}_difference"]))
  return cells


def provenance_text(result: dict) -> str:
  """'Provenance: runs differ in: lowering onednn vs cpu; ...', or why there is nothing to say."""
  missing = [name for name, has in zip("AB", result["provenance_recorded"], strict=True) if not has]
  if missing:
    return f"Provenance: not recorded in run {' and '.join(missing)}\n"
  differences = result["provenance_differences"]
  if not differences:
    return "Provenance: the same\n"
  return (
    "Provenance: runs differ in: "
    + "; ".join(f"{key} {_value(a)} vs {_value(b)}" for key, (a, b) in differences.items())
    + "\n"
  )


def two_run_text(result: dict, run_a: str, run_b: str) -> str:
  return (
    f"Paired comparison (differences are B - A) over {result['n_utterances']} test utterances "
    f"in {result['n_folds']} folds\n"
    f"  A: {run_a} (member {result['member_a']})\n"
    f"  B: {run_b} (member {result['member_b']})\n\n"
    + comparison_text(result)
    + "\n"
    + provenance_text(result)
  )


def sweep_text(result: dict, run: str) -> str:
  reference = (
    "alpha" if result.get("reference_alpha") is None else f"alpha={result['reference_alpha']}"
  )
  blocks = [
    f"Sweep {run}: each setting (B) against gamma 0 (A) with the same seed, learning rate and "
    f"{reference}; differences are B - A\n"
  ]
  for c in result["comparisons"]:
    blocks.append(
      f"## {compare.describe_setting(c['setting'])} vs {_reference_label(c)} (seeds "
      f"{', '.join(map(str, c['seeds']))}; members "
      f"{', '.join(map(str, c['members']))} vs {', '.join(map(str, c['reference_members']))})\n"
      f"{c['n_paired_predictions']} paired predictions ({c['n_utterances']} test utterances x "
      f"{len(c['seeds'])} seed{'s' if len(c['seeds']) != 1 else ''}) in {c['n_folds']} folds\n\n"
      + comparison_text(c)
    )
  return "\n".join(blocks)


def _warn_inconsistent(run: str) -> None:
  try:
    problems = compare.consistency_problems(run)
  except (KeyError, TypeError, ValueError) as error:
    problems = [f"could not be checked ({error!r})"]
  for problem in problems:
    print(f"warning: {run}: results.json vs predictions.csv: {problem}", file=sys.stderr)


def _reference_label(comparison: dict) -> str:
  """'gamma=0', or 'gamma=0, alpha=...' where the reference's alpha differs from the setting's."""
  reference = comparison["reference"]
  if reference["alpha"] == comparison["setting"]["alpha"]:
    return "gamma=0"
  return f"gamma=0, alpha={reference['alpha'] or 'none'}"


def compare_main(values: flags.FlagValues, runs: Sequence[str]) -> int:
  """--compare: one sweep run, or two runs; returns the exit status."""
  try:
    summaries = [run_results.read(run) for run in runs]
    predictions = [compare.load_predictions(run) for run in runs]
    for run in runs:
      _warn_inconsistent(run)
    options = {"n_resamples": values.resamples, "seed": values.seed}
    if len(runs) == 1:
      result = compare.compare_sweep(
        predictions[0], summaries[0], reference_alpha=values.reference, **options
      )
      result = {"run": runs[0], "reference_alpha": values.reference, **result}
      text = sweep_text(result, runs[0])
    else:
      member_a, member_b = values.member * 2 if len(values.member) == 1 else values.member
      result = compare.compare_runs(
        *predictions, *summaries, member_a=member_a, member_b=member_b, **options
      )
      result = {"run_a": runs[0], "run_b": runs[1], **result}
      text = two_run_text(result, *runs)
  except (ReportError, run_results.ResultsError, compare.CompareError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(text, end="")
  if values.json:
    print(json.dumps(compare.json_ready(result)))
  return 0


def define_flags(values: flags.FlagValues) -> None:
  """The command line's flags; its positional arguments are the runs."""
  flags.DEFINE_bool(
    "figures", False, "(Re)write each run's confusion, curve, sweep PNGs.", flag_values=values
  )
  flags.DEFINE_bool(
    "compare",
    False,
    "Paired comparison of the runs given: RUN_A RUN_B (B - A), or one sweep RUN (each gamma "
    "vs gamma 0).",
    flag_values=values,
  )
  flags.DEFINE_multi_integer(
    "member",
    [0],
    "With --compare RUN_A RUN_B: the sweep member to use, once for both runs or once per "
    "run (--member=1 --member=3).",
    flag_values=values,
  )
  flags.DEFINE_integer(
    "resamples",
    compare.DEFAULT_RESAMPLES,
    "Bootstrap resamples and permutations for --compare.",
    lower_bound=1,
    flag_values=values,
  )
  flags.DEFINE_string(
    "reference",
    None,
    "With --compare SWEEP_RUN: compare every setting with the gamma-0 member of this alpha "
    "('none', 'inverse_frequency' or weights), not the one of its own alpha.",
    flag_values=values,
  )
  flags.DEFINE_integer("seed", 0, "Seed of the resampling in --compare.", flag_values=values)
  flags.DEFINE_bool(
    "json", False, "With --compare: end with the numbers as one JSON line.", flag_values=values
  )
  flags.DEFINE_bool(
    "emobox",
    False,
    "Print the runs as EmoBox's intra-corpus leaderboard: corpus, folds, UA, WA, macro F1 "
    "(mean over folds), and pooled.",
    flag_values=values,
  )


def report(values: flags.FlagValues, runs: Sequence[str]) -> int:
  """The table of `runs` (or their comparison, with --compare); returns the exit status."""
  if values.compare:
    if values.figures or values.emobox:
      raise app.UsageError("--compare goes without --figures and --emobox")
    if len(runs) not in (1, 2):
      raise app.UsageError(f"--compare takes one sweep run or two runs, got {len(runs)}")
    if values.reference is not None and len(runs) != 1:
      raise app.UsageError("--reference goes with --compare SWEEP_RUN")
    if len(values.member) > 2 or (values.member != [0] and len(runs) == 1):
      raise app.UsageError("--member is given once or twice, and only with --compare RUN_A RUN_B")
    return compare_main(values, runs)
  if not runs:
    raise app.UsageError("give RUN_DIR... for the table, or --compare RUN_A RUN_B")
  if values.json:
    raise app.UsageError("--json goes with --compare")
  table_rows, n_skipped = [], 0
  for run in runs:
    try:
      summary = run_results.read(run)
      if values.emobox:
        table_rows.append(_checked(emobox_row, run, summary))
      else:
        table_rows.extend(run_rows(run, summary))
    except (ReportError, run_results.ResultsError) as error:
      print(f"error: {error}; skipped", file=sys.stderr)
      n_skipped += 1
      continue
    if values.figures:
      records = results.MetricsLog(pathlib.Path(run) / layout.METRICS).read()
      written = plots.write_figures(run, summary, records)
      print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
  if not table_rows:
    print("error: no readable run; nothing to report", file=sys.stderr)
    return 1
  print((emobox_table if values.emobox else markdown_table)(table_rows), end="")
  return 1 if n_skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m ser_jax.report RUN_DIR...`; `argv` as command_line.run_flags takes it."""
  return command_line.run_flags(define_flags, report, argv)


if __name__ == "__main__":
  sys.exit(main())
