"""A study's results.json, results.md and figures (forest.png, cross_corpus.png)."""

from __future__ import annotations

import pathlib

from ser_jax import io_utils, plots
from ser_jax.render import markdown_table


def _pm(entry: dict, score: str) -> str:
  """'mean +/- sd' over folds of `score` ('wa' or 'ua')."""
  return f"{entry[f'{score}_fold_mean']:.1f} +/- {entry[f'{score}_fold_std']:.1f}"


def _interval(difference: dict, metric: str) -> str:
  low, high = difference[f"{metric}_difference_ci95"]
  return f"{difference[f'{metric}_difference']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _p(value: float) -> str:
  return f"{value:.3g}"


def _difference_cells(difference: dict) -> list[str]:
  """The UA and WA differences with their intervals and p-values."""
  return [
    _interval(difference, "ua"),
    _p(difference["ua_p_value"]),
    _interval(difference, "wa"),
    _p(difference["wa_p_value"]),
  ]


def _corpus_row(name: str, row: dict) -> list[str]:
  if row["status"] != "ok":
    return [name, row["reader"], "", "", "", "", f"failed: {row['error']}"]
  counts = ", ".join(f"{c} {n}" for c, n in row["class_counts"].items())
  folds = f"{row['n_folds']} {row['cv_scheme']}"
  if row["cv_scheme"] == "speaker" and set(row["test_speakers_per_fold"]) == {1}:
    folds += " (leave one speaker out)"
  return [name, row["reader"], row["utterances"], row["speakers"], counts, folds, "ok"]


def _within_row(corpus: str, setting: str, entry: dict) -> list[str]:
  if entry["status"] != "ok":
    return [corpus, setting, f"failed: {entry['error']}", "", "", "", "", ""]
  scores = [_pm(entry, "wa"), _pm(entry, "ua")]
  if "difference" not in entry:
    return [corpus, setting, *scores, "(reference)", "", "", ""]
  return [corpus, setting, *scores, *_difference_cells(entry["difference"])]


def _pooled_row(setting: str, metric: str, pooled: dict) -> list[str]:
  if "not_pooled" in pooled:
    start = [setting, metric.upper(), len(pooled["corpora"])]
    return [*start, f"not pooled: {pooled['not_pooled']}", "", "", "", "", ""]
  low, high = pooled["ci95"]
  common_low, common_high = pooled["common_effect_ci95"]
  return [
    setting,
    metric.upper(),
    pooled["k"],
    f"{pooled['estimate']:+.2f} [{low:+.2f}, {high:+.2f}]",
    _p(pooled["p_value"]),
    f"{pooled['tau2']:.2f}",
    f"{pooled['i2']:.0f}",
    f"{pooled['q']:.2f} ({pooled['q_df']}, {_p(pooled['q_p_value'])})",
    f"{pooled['common_effect']:+.2f} [{common_low:+.2f}, {common_high:+.2f}]",
  ]


def study_markdown(summary: dict) -> str:
  """results.md: corpora, within-corpus results, pooled differences, matrices, failures."""
  study = summary["study"]
  reference = study["reference"]
  settings = list(study["settings"])
  differences = [f"UA - {reference} [95 % CI]", "p", f"WA - {reference} [95 % CI]", "p"]
  lines = [
    f"# Study: {', '.join(settings)} on {', '.join(study['corpora'])}",
    "",
    f"Every run starts from `{study['base']}`. Settings: "
    + "; ".join(f"{name}: {text}" for name, text in study["settings"].items())
    + f". Reference: {reference}. This invocation took {summary['wall_seconds']:.0f} s.",
    "",
    "## Corpora (as trained by the reference run)",
    "",
    *markdown_table(
      ("corpus", "reader", "utterances", "speakers", "class counts", "folds", "status"),
      [_corpus_row(name, row) for name, row in summary["corpora"].items()],
    ),
    "",
    "## Within each corpus",
    "",
    f"WA and UA: mean +/- sd over folds (%). Differences: setting minus {reference} on the same "
    "test utterances (pooled over folds), 95 % paired-bootstrap interval resampled within "
    "folds, p from the paired permutation test (UA) and the exact McNemar test (WA), as "
    "`python -m ser_jax.report --compare` gives them.",
    "",
    *markdown_table(
      ("corpus", "setting", "WA", "UA", *differences),
      [
        _within_row(corpus, setting, entry)
        for corpus, rows in summary["within"].items()
        for setting, entry in rows.items()
      ],
    ),
    "",
    "## Pooled across corpora",
    "",
    f"Method: {study['meta_analysis']}, over the per-corpus differences with their bootstrap "
    "variances (see ser_jax/meta.py for why). Common effect: inverse-variance weights, normal "
    "interval (these corpora only).",
    "",
    *markdown_table(
      (f"setting - {reference}", "metric", "corpora", "pooled [95 % CI]", "p", "tau^2")
      + ("I^2 (%)", "Q (df, p)", "common effect [95 % CI]"),
      [
        _pooled_row(setting, metric, pooled)
        for setting, metrics in summary["pooled"].items()
        for metric, pooled in metrics.items()
      ],
    ),
  ]
  if "cross_corpus" in summary:
    lines += _cross_markdown(summary["cross_corpus"], differences)
  if summary["failures"]:
    lines += ["", "## Failures", ""] + [f"- {line}" for line in summary["failures"]]
  return "\n".join(lines) + "\n"


def _cross_markdown(cross: dict, differences: list[str]) -> list[str]:
  lines = [
    "",
    "## Across corpora",
    "",
    "UA (%) of the model trained on every kept utterance of the row's corpus and tested on "
    "every utterance of the column's, on the classes both have (features standardised with "
    "the training corpus's statistics); the diagonal is the within-corpus cross-validated UA.",
  ]
  for setting, matrix in cross["ua"].items():
    names = matrix["corpora"]
    rows = [
      [name, *("failed" if v is None else f"{v:.1f}" for v in row)]
      for name, row in zip(names, matrix["ua"], strict=True)
    ]
    lines += ["", f"{setting}:", "", *markdown_table(("trained on \\ tested on", *names), rows)]
  if cross["differences"]:
    rows = []
    for pair in cross["differences"]:
      start = [pair["train"], pair["test"], ", ".join(pair["classes"] or []), pair["setting"]]
      difference = pair.get("difference")
      rows.append(start + (_difference_cells(difference) if difference else ["failed", "", "", ""]))
    lines += [
      "",
      *markdown_table(("trained on", "tested on", "classes", "setting", *differences), rows),
    ]
  return lines


def write_study(workdir: pathlib.Path, summary: dict) -> list[pathlib.Path]:
  """results.json, results.md, forest.png (when there are differences) and cross_corpus.png."""
  io_utils.atomic_write_json(workdir / "results.json", summary)
  io_utils.atomic_write_text(workdir / "results.md", study_markdown(summary))
  written = [workdir / "results.json", workdir / "results.md"]
  reference = summary["study"]["reference"]
  panels = []
  for setting, metrics in summary["pooled"].items():
    rows = [
      {
        "label": corpus,
        "estimate": entry["difference"]["ua_difference"],
        "low": entry["difference"]["ua_difference_ci95"][0],
        "high": entry["difference"]["ua_difference_ci95"][1],
      }
      for corpus, entries in summary["within"].items()
      if "difference" in (entry := entries[setting])
    ]
    pooled = metrics["ua"]
    if "estimate" in pooled:
      rows += [
        {
          "label": f"pooled, random effects ({pooled['k']} corpora)",
          "estimate": pooled["estimate"],
          "low": pooled["ci95"][0],
          "high": pooled["ci95"][1],
          "pooled": True,
        },
        {
          "label": "common effect (these corpora)",
          "estimate": pooled["common_effect"],
          "low": pooled["common_effect_ci95"][0],
          "high": pooled["common_effect_ci95"][1],
          "pooled": True,
          "colour": "tab:grey",
        },
      ]
    if rows:
      panels.append({"title": f"{setting} - {reference}", "rows": rows})
  if panels:
    written.append(workdir / "forest.png")
    plots.plot_forest(panels, written[-1], "UA difference (points), 95 % interval")
  if summary.get("cross_corpus"):
    matrices = [
      {"title": setting, **matrix} for setting, matrix in summary["cross_corpus"]["ua"].items()
    ]
    if matrices and matrices[0]["corpora"]:
      written.append(workdir / "cross_corpus.png")
      plots.plot_cross_corpus(matrices, written[-1])
  return written
