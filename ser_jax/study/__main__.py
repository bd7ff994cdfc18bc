"""The study's command line: `python -m ser_jax.study --config=STUDY_CONFIG --workdir=W`.

The study runs in one process, or as one job per run: `--list_runs` prints them, `--run=PATH`
or `--task_index=I` (a SLURM array's $SLURM_ARRAY_TASK_ID; launch/slurm_study.sbatch) runs
one, and `--summarise` then writes the table from whatever has finished, running nothing.
`--settings=NAME:key=value,...` (repeated) replaces the study config's settings, the first
the reference; `--config.<key>=value` overrides any key, over every setting (see compose).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from ser_jax import cli, command_line
from ser_jax.config import ConfigError
from ser_jax.study import compose, run


def check_command_line(argv: Sequence[str]) -> None:
  """Exits with one line when --config names no file, a `--config.<key>=` override names no
  key of the study config (which this reads, as the flag will) or sets study.base, which the
  config builds on."""
  if "study.base" in cli.override_keys(argv):
    print(
      "error: study.base is the config the study config file builds on "
      "(compose.study_config(BASE)); give a study config file built on another base",
      file=sys.stderr,
    )
    sys.exit(2)
  spec = cli.config_spec(argv)
  if spec is None:
    return  # The --config flag reports it.
  try:
    reference = compose.load_config_file(spec)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  cli.check_command_line(argv, reference)


def main() -> None:
  """The command line: flags are defined here, so that importing this module defines none."""
  config_flag = cli.config_flag()
  workdir_flag = cli.workdir_flag()
  fresh_flag = flags.DEFINE_bool("fresh", False, "Discard the whole study and start again.")
  settings_flag = flags.DEFINE_multi_string(
    "settings",
    None,
    "Replace study.settings: NAME:key=value,key=value, once per setting, the first the "
    "reference, e.g. --settings=softmax:loss.name=softmax --settings=focal:loss.gamma=2.0.",
  )
  run_flag = flags.DEFINE_string(
    "run", None, "Run only this run, e.g. emodb/focal or emodb-to-casia/focal (--list_runs)."
  )
  task_flag = flags.DEFINE_integer(
    "task_index",
    None,
    "Run only the run of this index in --list_runs (0 first), e.g. $SLURM_ARRAY_TASK_ID.",
  )
  list_flag = flags.DEFINE_bool("list_runs", False, "Print the study's runs, one a line, and exit.")
  summarise_flag = flags.DEFINE_bool(
    "summarise", False, "Run nothing: write the table of the runs that have finished."
  )
  flags.mark_flags_as_required(["config", "workdir"])

  def study(argv) -> int:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    modes = [run_flag.value is not None, task_flag.value is not None, summarise_flag.value]
    if sum(modes) > 1 or (fresh_flag.value and any(modes)):
      raise app.UsageError("give at most one of --run, --task_index and --summarise, no --fresh")
    cli.setup_logging()
    cli.use_compilation_cache()
    command_line_keys = cli.override_keys(sys.argv)
    config = config_flag.value
    with cli.clear_errors():
      if settings_flag.value:
        with config.unlocked():
          config.study.settings = compose.settings_group(settings_flag.value)
          if "study.reference" not in command_line_keys:
            config.study.reference = compose.parse_setting(settings_flag.value[0])[0]
      study_corpora, settings = compose.study_parts(config)
      paths = compose.run_paths(study_corpora, settings, config.study.cross_corpus)
      if list_flag.value:
        print("\n".join(f"{i}\t{path}" for i, path in enumerate(paths)))
        return 0
      only = run_flag.value
      if task_flag.value is not None:
        if not 0 <= task_flag.value < len(paths):
          raise app.UsageError(
            f"--task_index={task_flag.value}; the study has runs 0..{len(paths) - 1} "
            "(--list_runs); a SLURM array of them is --array=0-" + str(len(paths) - 1)
          )
        only = paths[task_flag.value]
      if only is not None:
        outcome = run.run_one(config, workdir_flag.value, only, command_line_keys=command_line_keys)
        if outcome.error:
          print(f"failed: run {only}: {outcome.error}", file=sys.stderr)
          return 1
        print(f"finished {pathlib.Path(workdir_flag.value) / only}", file=sys.stderr)
        return 0
      summary = run.run_study(
        config,
        workdir_flag.value,
        fresh=fresh_flag.value,
        command_line_keys=command_line_keys,
        summarise_only=summarise_flag.value,
      )
    for line in summary["failures"]:
      print(f"failed: {line}", file=sys.stderr)
    print(f"wrote {pathlib.Path(workdir_flag.value) / 'results.md'}", file=sys.stderr)
    return 1 if summary["failures"] else 0

  app.run(study, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
  from ser_jax import cpu

  cpu.tune_process()
  check_command_line(sys.argv)
  main()
