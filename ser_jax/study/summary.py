"""The numbers of a study's table: per corpus and setting WA and UA, the paired differences
from the reference setting (ser_jax.compare, as `report --compare` computes them: one
bootstrap per difference gives its interval and its standard error), their random-effects
pool over corpora (ser_jax.meta), and the matrices across corpora."""

from __future__ import annotations

import pathlib

from ser_jax import compare, meta, run_results
from ser_jax.study.compose import Outcome, cross_path, crosses, within_path


def paired_difference(run_a: pathlib.Path, run_b: pathlib.Path, n_resamples: int) -> dict:
  """`report --compare run_a run_b` (B - A), whose standard errors come from the draws that
  give its intervals."""
  predictions_a, predictions_b = compare.load_predictions(run_a), compare.load_predictions(run_b)
  summaries = [run_results.read(run) for run in (run_a, run_b)]
  return compare.json_ready(
    compare.compare_runs(predictions_a, predictions_b, *summaries, n_resamples=n_resamples)
  )


def _corpus_facts(run_dir: pathlib.Path, results: run_results.RunResults) -> dict:
  """Utterances, speakers and class counts as the run trained on them, and its folds."""
  predictions = compare.load_predictions(run_dir)
  first = predictions.member == 0
  folds = sorted(set(predictions.fold[first].tolist()))
  used = results.class_counts["used"]
  return {
    "utterances": int(sum(used.values())),
    "speakers": len(set(predictions.speaker[first].tolist())),
    "class_counts": used,
    "cv_scheme": results.config["cv"]["scheme"],
    "n_folds": len(results.members[0].folds),
    "test_speakers_per_fold": [
      len(set(predictions.speaker[first & (predictions.fold == f)].tolist())) for f in folds
    ],
  }


def _run_entry(workdir, outcome: Outcome, path: str, reference: str, n_resamples: int) -> dict:
  """A run's WA and UA (mean +/- sd over folds) and its paired difference from `reference`."""
  if outcome.result is None:
    return {"run": path, "status": "failed", "error": outcome.error}
  model = outcome.result.members[0]
  entry: dict = {
    "run": path,
    "status": "ok",
    "wa_fold_mean": model.wa_fold_mean,
    "wa_fold_std": model.wa_fold_std,
    "ua_fold_mean": model.ua_fold_mean,
    "ua_fold_std": model.ua_fold_std,
  }
  if path != reference:
    entry["difference"] = paired_difference(workdir / reference, workdir / path, n_resamples)
  return entry


def _pool(rows: dict[str, dict], metric: str) -> dict:
  """The random-effects pool of the corpora's `metric` ('ua' or 'wa') differences."""
  ok = {name: row["difference"] for name, row in rows.items() if "difference" in row}
  effects = [d[f"{metric}_difference"] for d in ok.values()]
  variances = [d[f"{metric}_standard_error"] ** 2 for d in ok.values()]
  if len(ok) < 2:
    return {
      "corpora": list(ok),
      "not_pooled": f"{len(ok)} corpus with a difference; pooling needs 2",
    }
  zero = [name for name, v in zip(ok, variances, strict=True) if not v > 0]
  if zero:
    return {
      "corpora": list(ok),
      "not_pooled": f"the difference on {', '.join(zero)} has no bootstrap variance (the two "
      "runs predict alike on every utterance), so inverse-variance weights are undefined",
    }
  return {"corpora": list(ok), **meta.random_effects(effects, variances).as_dict()}


def summarise(config, workdir, study_corpora, settings, failures, outcomes) -> dict:
  """The study's results.json: corpora, runs, paired differences, pooled estimates, matrices."""
  reference = settings[0].name
  n_resamples = int(config.study.resamples)
  corpus_rows, within = {}, {}
  for corpus in study_corpora:
    row = {"reader": corpus.reader, "root": corpus.root}
    if corpus.name in failures:
      corpus_rows[corpus.name] = {**row, "status": "failed", "error": failures[corpus.name]}
      continue
    reference_path = within_path(corpus.name, reference)
    facts = _corpus_facts(workdir / reference_path, outcomes[reference_path].result)
    corpus_rows[corpus.name] = {**row, "status": "ok", **facts}
    within[corpus.name] = {
      s.name: _run_entry(
        workdir,
        outcomes.get(within_path(corpus.name, s.name), Outcome(None, "not run")),
        within_path(corpus.name, s.name),
        reference_path,
        n_resamples,
      )
      for s in settings
    }
  summary = {
    "study": {
      "base": config.study.base,
      "reference": reference,
      "settings": {s.name: s.describe() for s in settings},
      "corpora": {
        c.name: f"{c.reader}:{c.root}" + (f"@{c.audio_root}" if c.audio_root else "")
        for c in study_corpora
      },
      "cross_corpus": bool(config.study.cross_corpus),
      "resamples": n_resamples,
      "meta_analysis": meta.METHOD,
    },
    "corpora": corpus_rows,
    "within": within,
    "pooled": {
      s.name: {
        metric: _pool({name: rows[s.name] for name, rows in within.items()}, metric)
        for metric in ("ua", "wa")
      }
      for s in settings[1:]
    },
  }
  if config.study.cross_corpus:
    summary["cross_corpus"] = _cross_summary(
      workdir,
      [c.name for c in study_corpora if c.name in within and crosses(c)],
      settings,
      outcomes,
      within,
      n_resamples,
    )
  summary["failures"] = [f"corpus {name}: {error}" for name, error in failures.items()] + [
    f"run {path}: {outcome.error}" for path, outcome in outcomes.items() if outcome.error
  ]
  return compare.json_ready(summary)


def _cross_summary(workdir, names, settings, outcomes, within, n_resamples) -> dict:
  """Per setting, the train x test UA matrix (diagonal: within-corpus CV) and, per pair,
  the paired difference from the reference setting."""
  reference = settings[0].name
  matrices, pairs = {}, []
  for setting in settings:
    matrix = []
    for train in names:
      row = []
      for test in names:
        if train == test:
          entry = within[train][setting.name]
          row.append(entry.get("ua_fold_mean"))
          continue
        outcome = outcomes.get(cross_path(train, test, setting.name), Outcome(None))
        row.append(outcome.result.members[0].ua_fold_mean if outcome.result else None)
      matrix.append(row)
    matrices[setting.name] = {"corpora": names, "ua": matrix}
  for train in names:
    for test in names:
      if train == test:
        continue
      reference_outcome = outcomes.get(cross_path(train, test, reference), Outcome(None))
      classes = list(reference_outcome.result.class_names) if reference_outcome.result else None
      for setting in settings[1:]:
        outcome = outcomes.get(cross_path(train, test, setting.name), Outcome(None))
        pair = {"train": train, "test": test, "setting": setting.name, "classes": classes}
        if reference_outcome.result and outcome.result:
          pair["difference"] = paired_difference(
            workdir / cross_path(train, test, reference),
            workdir / cross_path(train, test, setting.name),
            n_resamples,
          )
        pairs.append(pair)
  return {"ua": matrices, "differences": pairs}
