"""What the entry points share: logging, one-line errors, the compilation cache and
multi-process start-up."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from ser_jax import audio, checkpoints, config_tree, io_utils, memory, trainer
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
  io_utils.DiskFullError,
  checkpoints.UnreadableCheckpointError,
  memory.MemoryPlanError,
  FileNotFoundError,
  # A workdir or cache that is a file, or that this user may not write.
  FileExistsError,
  NotADirectoryError,
  PermissionError,
)


@functools.cache
def config_flag():
  """The --config flag (a locked ml_collections config file), defined once per process so
  that every entry point's module can be imported together."""
  return config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)


@functools.cache
def workdir_flag():
  return flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.")


def override_keys(argv: Sequence[str]) -> list[str]:
  """The dotted keys of the `--config.<key>=value` overrides on a command line."""
  return [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def config_spec(argv: Sequence[str]) -> str | None:
  """The --config flag's value (a file, optionally with ':' and its argument), if given."""
  for k, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config" and k + 1 < len(argv):
      return argv[k + 1]
  return None


def check_command_line(
  argv: Sequence[str], reference: ml_collections.ConfigDict | None = None
) -> None:
  """Exits with one line when --config names no file, or a `--config.<key>=` override
  names no key of `reference` (default: ser_jax.config's), naming the nearest key.

  ml_collections would raise a traceback from inside flag parsing (OSError, AttributeError).
  """
  from ser_jax.config import default_config

  spec = config_spec(argv)
  if spec and not os.path.isfile(path := spec.partition(":")[0]):
    folder = os.path.dirname(path) or "."
    found = (
      sorted(n for n in os.listdir(folder) if n.endswith(".py")) if os.path.isdir(folder) else []
    )
    where = f"; {folder} holds {', '.join(found)}" if found else ""
    print(f"error: --config={spec}: there is no config file {path}{where}", file=sys.stderr)
    sys.exit(2)
  reference = default_config() if reference is None else reference
  for key in override_keys(argv):
    try:
      config_tree.check_key(reference, key)
    except ConfigError as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)


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
  if not (values.coordinator_address or values.distributed):
    return
  # CPU processes exchange collectives through gloo; accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if values.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=values.coordinator_address,
      num_processes=values.num_processes,
      process_id=values.process_id,
    )
  else:
    jax.distributed.initialize()
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    connect_cpu_collectives()


# How long the start-up barrier waits for every process: as long as jax.distributed.initialize
# waits for them to connect (its initialization_timeout).
BARRIER_SECONDS = 300


def connect_cpu_collectives() -> None:
  """Connects gloo over every device with one all-reduce, while the processes are in step.

  XLA:CPU connects gloo at the first collective over a set of devices, and there a process
  waits only 30 s for the others to arrive (gloo's default, which XLA does not change and
  jax does not expose), then dies with "GetKeyValue() timed out with key:
  cpu:gloo/<device ids>/<rank>". Later collectives wait 30 minutes. A run's first
  collective comes after loading the store and compiling, which a loaded machine can make
  tens of seconds longer in one process than in another (tests/test_sharding.py). Here the
  processes have just left the backend's topology exchange together; the all-reduce is
  compiled, then runs behind a barrier that waits BARRIER_SECONDS. The mesh is the run's,
  so its collectives reuse the connection.
  """
  import jax.numpy as jnp
  import numpy as np

  from ser_jax.sharding import Topology

  topology = Topology.create()
  ones = jax.make_array_from_process_local_data(
    topology.batch, np.ones(jax.local_device_count(), np.int32)
  )
  count_devices = jax.jit(jnp.sum, out_shardings=topology.replicated).lower(ones).compile()
  # jax has no public barrier that is not itself a collective (multihost_utils'
  # sync_global_devices is one); Orbax waits on the same client.
  client = jax._src.distributed.global_state.client
  client.wait_at_barrier("ser_jax_connect_cpu_collectives", timeout_in_ms=BARRIER_SECONDS * 1000)
  if (count := int(count_devices(ones))) != jax.device_count():
    raise RuntimeError(f"the start-up all-reduce counted {count} of {jax.device_count()} devices")


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
  except (*USER_ERRORS, experiment.ConfigMismatchError, trainer.NonFiniteLossError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
