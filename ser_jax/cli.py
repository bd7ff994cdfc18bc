"""What the entry points share: logging, one-line errors, the compilation cache and
multi-process start-up."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from ser_jax import audio, io_utils, memory
from ser_jax.cache import default_cache_dir
from ser_jax.config import ConfigError
from ser_jax.data.corpus import CorpusError
from ser_jax.folds import FoldError

# Errors a user can fix; they get one line, not a traceback.
USER_ERRORS = (
  ConfigError,
  CorpusError,
  FoldError,
  audio.AudioError,
  io_utils.LockedError,
  memory.MemoryPlanError,
  FileNotFoundError,
)


@functools.cache
def config_flag():
  """The --config flag (a locked ml_collections config file), defined once per process so
  that every entry point's module can be imported together."""
  return config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)


@functools.cache
def workdir_flag():
  return flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.")


def check_override_keys(argv: list[str]) -> None:
  """Exits with one line when a `--config.<key>=` override names no config key.

  ml_collections would raise an AttributeError traceback from inside flag parsing.
  """
  from ser_jax.config import default_config

  reference = default_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    node = reference
    for depth, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node:
        prefix = ".".join(key.split(".")[:depth])
        known = ", ".join(sorted(f"{prefix + '.' if prefix else ''}{k}" for k in node.keys()))
        print(f"error: unknown config key '{key}'; known keys here: {known}", file=sys.stderr)
        sys.exit(2)
      node = node[part]


def define_distributed_flags() -> None:
  flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for runs across processes."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed from the environment (Cloud TPU, SLURM)."
  )


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when flags or --distributed ask for a multi-process run."""
  values = flags.FLAGS
  if values.coordinator_address or values.distributed:
    # CPU processes exchange collectives through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if values.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=values.coordinator_address,
      num_processes=values.num_processes,
      process_id=values.process_id,
    )
  elif values.distributed:
    jax.distributed.initialize()


def setup_logging() -> None:
  logging.basicConfig(
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(message)s",
    stream=sys.stderr,
    force=True,
  )
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def use_compilation_cache() -> None:
  """Keeps compiled programs in <cache>/xla, so that reruns, resumed runs and predictions
  load them instead of compiling again. A JAX_COMPILATION_CACHE_DIR setting wins (empty:
  no cache)."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  path = default_cache_dir() / "xla"
  jax.config.update("jax_compilation_cache_dir", str(path))
  logging.info("Compiled programs are cached in %s", path)


@contextlib.contextmanager
def clear_errors():
  """Turns a user's mistake into `error: <message>` and exit status 2."""
  from ser_jax import experiment

  try:
    yield
  except (*USER_ERRORS, experiment.ConfigMismatchError, experiment.NonFiniteLossError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
