"""Runs a study, or resumes it: every run at once (run_study), or one run as a job of its own
(run_one) and then the table of whatever has finished (run_study(..., summarise_only=True)).

A rerun reads finished runs (their files untouched), resumes unfinished ones from their
checkpoints, and retries failed ones. A corpus that cannot be read fails alone, with one
line, and the table says so.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from collections.abc import Iterable

import ml_collections

from ser_jax import experiment, io_utils, layout, run_results
from ser_jax.config import ConfigError, validate_config
from ser_jax.study import compose, render, summary
from ser_jax.study.compose import RUN_ERRORS, Outcome, Run


def _finished(run_dir: pathlib.Path) -> bool:
  # A run writes predictions.csv after results.json, so both mean it finished.
  return (run_dir / layout.RESULTS).is_file() and (run_dir / layout.PREDICTIONS).is_file()


def _read_finished(run: Run, run_dir: pathlib.Path) -> Outcome:
  compose.check_finished_run(run, run_dir)
  logging.info("Run %s already finished; reading its results", run.path)
  return Outcome(run_results.read(run_dir))


def execute(run: Run, workdir: pathlib.Path) -> Outcome:
  """The results of a finished, resumed or new run, or the line saying why it failed."""
  run_dir = workdir / run.path
  if _finished(run_dir):
    return _read_finished(run, run_dir)
  logging.info("Run %s", run.path)
  try:
    return Outcome(experiment.train_and_evaluate(run.config, str(run_dir)))
  except RUN_ERRORS as error:
    logging.error("Run %s failed: %s", run.path, error)
    return Outcome(None, str(error))


def read_finished(run: Run, workdir: pathlib.Path) -> Outcome:
  """The results of a finished run, or why there are none: it has not finished."""
  run_dir = workdir / run.path
  if not _finished(run_dir):
    return Outcome(None, f"not finished (python -m ser_jax.study ... --run={run.path} runs it)")
  return _read_finished(run, run_dir)


def run_study(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  fresh: bool = False,
  command_line_keys: Iterable[str] = (),
  summarise_only: bool = False,
) -> dict:
  """Runs (or resumes) every run of the study; writes and returns its results. With
  `summarise_only`, runs nothing: the table holds the runs that have finished (those that
  have not are failures of the table, each naming how to run it)."""
  start = time.time()
  study_corpora, settings = compose.study_parts(config)
  # Every run's config is checked before anything runs: a bad key fails the study at once.
  for corpus in study_corpora:
    for setting in settings:
      validate_config(compose.run_config(config, corpus, setting, command_line_keys))
  workdir = pathlib.Path(workdir)
  if fresh and workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  act = read_finished if summarise_only else execute
  # A summary waits for a whole study running in the same workdir; a second whole study is
  # refused. Single runs (run_one) only check the config under this lock.
  with io_utils.file_lock(workdir / "study.lock", f"study workdir {workdir}", wait=summarise_only):
    compose.check_same_study(config, workdir)
    failures: dict[str, str] = {}  # Corpus -> why it failed.
    classes: dict[str, tuple[str, ...]] = {}
    outcomes: dict[str, Outcome] = {}
    for corpus in study_corpora:
      try:
        runs, classes[corpus.name] = compose.within_runs(
          config, corpus, settings, command_line_keys
        )
      except RUN_ERRORS as error:
        failures[corpus.name] = str(error)
        logging.error("Corpus %s failed: %s; the study goes on without it", corpus.name, error)
        continue
      for run in runs:
        outcomes[run.path] = act(run, workdir)
        if outcomes[run.path].error and run.setting == settings[0].name:
          failures[corpus.name] = f"its {run.setting} run failed: {outcomes[run.path].error}"
          logging.error("Corpus %s failed; the study goes on without it", corpus.name)
          break
    if config.study.cross_corpus:
      usable = [c for c in study_corpora if c.name not in failures]
      if not all(map(compose.crosses, usable)):
        logging.info("EmoBox corpora are left out of the runs across corpora")
      for setting in settings:
        for train, test in compose.cross_pairs(usable):
          path = compose.cross_path(train.name, test.name, setting.name)
          try:
            run = compose.cross_run(
              config, train, test, setting, classes[test.name], command_line_keys
            )
          except RUN_ERRORS as error:
            logging.error("Run %s failed: %s", path, error)
            outcomes[path] = Outcome(None, str(error))
            continue
          outcomes[path] = act(run, workdir)
    table = summary.summarise(config, workdir, study_corpora, settings, failures, outcomes)
    table["wall_seconds"] = time.time() - start
    render.write_study(workdir, table)
  return table


def run_one(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  path: str,
  *,
  command_line_keys: Iterable[str] = (),
) -> Outcome:
  """Runs (or resumes, or reads) the one run `path` of the study (see compose.run_paths), so
  that runs can be separate jobs; `run_study(..., summarise_only=True)` then makes the
  table. Jobs started together are safe: each run has its own workdir lock, and runs that
  share a feature store wait for the one that builds it."""
  study_corpora, settings = compose.study_parts(config)
  paths = compose.run_paths(study_corpora, settings, config.study.cross_corpus)
  if path not in paths:
    raise ConfigError(f"study has no run {path!r}; its runs: {', '.join(paths)}")
  folder, setting_name = path.rsplit("/", 1)
  by_name = {c.name: c for c in study_corpora}
  setting = next(s for s in settings if s.name == setting_name)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with io_utils.file_lock(workdir / "study.lock", f"study workdir {workdir}", wait=True):
    compose.check_same_study(config, workdir)
  try:
    if folder in by_name:
      (run,), _ = compose.within_runs(config, by_name[folder], [setting], command_line_keys)
    else:
      train, test = (by_name[name] for name in folder.split("-to-"))
      _, test_classes = compose.within_runs(config, test, settings[:1], command_line_keys)
      run = compose.cross_run(config, train, test, setting, test_classes, command_line_keys)
  except RUN_ERRORS as error:
    logging.error("Run %s failed: %s", path, error)
    return Outcome(None, str(error))
  return execute(run, workdir)
