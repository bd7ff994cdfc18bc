"""Builds a config's feature store only, and prints its path and class counts."""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from ser_jax import cli, command_line, run_data
from ser_jax.config import validate_config

_CONFIG = cli.config_flag()
cli.workdir_flag()  # Accepted so that commands match main's; unused here.
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  with cli.clear_errors():
    validate_config(_CONFIG.value)
    store = run_data.prepare_store(_CONFIG.value)
  counts = np.bincount(store.labels, minlength=len(store.class_names))
  print(store.path)
  for name, count in zip(store.class_names, counts, strict=True):
    print(f"{name}\t{count}")
  print(f"total\t{len(store)}\tskipped\t{store.meta['n_skipped']}")


if __name__ == "__main__":
  cli.check_command_line(sys.argv)
  sys.exit(app.run(main, flags_parser=command_line.parse_flags))
