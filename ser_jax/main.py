"""Runs an experiment: `python -m ser_jax.main --config=configs/mfcc_focal.py --workdir=runs/x`."""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags

from ser_jax import cli, command_line, cpu, experiment

_CONFIG = cli.config_flag()
_WORKDIR = cli.workdir_flag()
_FRESH = flags.DEFINE_bool("fresh", False, "Discard what the workdir holds and start again.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  cli.use_compilation_cache()
  cli.maybe_initialize_distributed()
  logging.info(
    "JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count()
  )
  with cli.clear_errors():
    experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)


if __name__ == "__main__":
  cpu.tune_process()
  cli.check_command_line(sys.argv)
  sys.exit(app.run(main, flags_parser=command_line.parse_flags))
