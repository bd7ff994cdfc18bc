"""How many models to train at once: a compiled program's memory against what the run can use.

A run's models are its folds times its sweep members. `train.models_per_program=0` means
"as many as fit": the experiment compiles the program for all of them, asks XLA how many
bytes it needs (`compiled_bytes`), asks the machine how many it can spare
(`available_bytes`), `plan_chunks` splits the models into even chunks, and `group_cells`
lays the chunks out as (fold, members) cells, each checkpointed in its own folder.
`plan_models_per_program` runs that loop, and `rows_on_device` decides whether the
features live on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import jax

from ser_jax import layout

GiB = 2**30

# Share of the available memory a chunk may take. On a CPU the rest of the process shares
# the same memory: the feature store's pages, Python and NumPy, the input pipeline's
# batches and XLA's own arena; and XLA's account of a step leaves out the allocator's
# overheads. On an accelerator the device memory holds little besides the step.
CPU_MARGIN = 0.75
ACCELERATOR_MARGIN = 0.9


# cgroup v1 reports "no limit" as the largest page-aligned 64-bit count.
_NO_CGROUP_LIMIT = 2**62


class MemoryPlanError(ValueError):
  """Not even one sweep member fits in the memory the run can use."""


def compiled_bytes(compiled) -> int:
  """Bytes a compiled program needs at once: arguments + outputs + temporaries + code.

  Donated arguments that the outputs reuse (`alias_size_in_bytes`) count once. A sharded
  program's figure is per device; CPU devices share the host, so there it is needed once
  per local device. Returns 0 when the backend gives no memory analysis; `plan_chunks`
  then plans without it.

  compiled: a `jax.stages.Compiled`, e.g. `jax.jit(f).lower(*args).compile()`.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  if isinstance(stats, (list, tuple)):  # One per device on some older jaxlibs.
    return max((_stats_bytes(s) for s in stats), default=0)
  return _stats_bytes(stats)


def _stats_bytes(stats) -> int:
  def field(name: str) -> int:
    return int(getattr(stats, name, 0) or 0)

  total = (
    field("argument_size_in_bytes")
    + field("output_size_in_bytes")
    - field("alias_size_in_bytes")
    + field("temp_size_in_bytes")
    + field("generated_code_size_in_bytes")
  )
  return max(total, 0)


def available_bytes(
  device=None,
  meminfo: str | os.PathLike = "/proc/meminfo",
  cgroup: str | os.PathLike = "/sys/fs/cgroup",
) -> int:
  """Bytes the run can still allocate on `device` (default: the least free local device).

  CPU: the host's MemAvailable, bounded by the cgroup's memory limit when one is set.
  Accelerators: the allocator's `bytes_limit - bytes_in_use`. Returns 0 when an
  accelerator reports no memory statistics; `plan_chunks` then plans without it.
  """
  devices = [device] if device is not None else jax.local_devices()
  if devices[0].platform == "cpu":
    return host_available_bytes(meminfo, cgroup)
  return min(_device_available_bytes(d) for d in devices)


def _device_available_bytes(device) -> int:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return 0
  return max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0)


def host_available_bytes(
  meminfo: str | os.PathLike = "/proc/meminfo", cgroup: str | os.PathLike = "/sys/fs/cgroup"
) -> int:
  """The host memory this process can still use: MemAvailable, within its cgroup's limit."""
  host = _meminfo_available(pathlib.Path(meminfo))
  if host is None:
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  limited = _cgroup_available(pathlib.Path(cgroup))
  return host if limited is None else min(host, limited)


def _meminfo_available(path: pathlib.Path) -> int | None:
  try:
    lines = path.read_text().splitlines()
  except OSError:
    return None
  for line in lines:
    if line.startswith("MemAvailable:"):
      value, *unit = line.split(":", 1)[1].split()
      return int(value) * (1024 if unit == ["kB"] else 1)
  return None


def _cgroup_available(root: pathlib.Path) -> int | None:
  """limit - usage of the cgroup v2 (memory.max) or v1 (memory/) controller; None without one.

  Usage leaves out inactive file pages (as `docker stats` and the kubelet do): the kernel
  reclaims them before it reaches the limit, and the feature store's pages are mostly such.
  """
  for limit_file, usage_file, stat_file, inactive_key in (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    (
      "memory/memory.limit_in_bytes",
      "memory/memory.usage_in_bytes",
      "memory/memory.stat",
      "total_inactive_file",
    ),
  ):
    limit = _read_int(root / limit_file)
    if limit is None:
      continue
    if limit >= _NO_CGROUP_LIMIT:
      return None
    usage = _read_int(root / usage_file) or 0
    usage -= min(_stat_value(root / stat_file, inactive_key), usage)
    return max(limit - usage, 0)
  return None


def _read_int(path: pathlib.Path) -> int | None:
  """The integer in a cgroup file; 'max' reads as no limit (a huge number); None if absent."""
  try:
    text = path.read_text().strip()
  except OSError:
    return None
  if text == "max":
    return _NO_CGROUP_LIMIT
  try:
    return int(text)
  except ValueError:
    return None


def _stat_value(path: pathlib.Path, key: str) -> int:
  try:
    lines = path.read_text().splitlines()
  except OSError:
    return 0
  for line in lines:
    name, _, value = line.partition(" ")
    if name == key and value.strip().isdigit():
      return int(value)
  return 0


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How a run's models split into chunks, each trained by one program."""

  n_models: int
  models_per_chunk: int  # The largest chunk; the last may hold fewer.
  n_chunks: int
  bytes_per_chunk: int  # XLA's estimate for the largest chunk; 0 when unknown.
  available: int  # Bytes the run could use when planned; 0 when unknown.
  limited_by: str  # What set the chunk size: 'models' (all at once), 'memory' or 'setting'.

  def describe(self) -> str:
    """One log line, e.g. '90 models: 6 chunks of 15, about 2.6 GiB per chunk, ...'."""
    chunks = "1 chunk" if self.n_chunks == 1 else f"{self.n_chunks} chunks"
    models = "1 model" if self.n_models == 1 else f"{self.n_models} models"
    line = f"{models}: {chunks} of {self.models_per_chunk}"
    if self.bytes_per_chunk:
      line += f", about {describe_bytes(self.bytes_per_chunk)} per chunk"
    line += (
      f", {describe_bytes(self.available)} available" if self.available else ", memory unknown"
    )
    reason = {
      "memory": "as many as fit",
      "models": "all at once",
      "setting": f"at most {self.models_per_chunk} at once, as set",
    }[self.limited_by]
    return f"{line} ({reason})"


def plan_chunks(
  n_models: int,
  bytes_per_model: int,
  available: int,
  platform: str,
  margin: float | None = None,
  at_most: int = 0,
) -> ChunkPlan:
  """Even chunks of as many models as fit in `margin` of `available` bytes.

  bytes_per_model: e.g. `compiled_bytes` of a program for n models, over n; 0 (unknown)
    or an unknown `available` (0) plans without memory: all models at once.
  platform: `jax.default_backend()`, for the default margin.
  margin: the share of `available` a chunk may take; CPU_MARGIN on a CPU, else
    ACCELERATOR_MARGIN.
  at_most: the most models a chunk may hold whatever fits (train.models_together,
    train.models_per_program); 0: no such bound.

  Raises MemoryPlanError when one model needs more than that share.
  """
  if n_models < 1:
    raise ValueError(f"n_models={n_models}; a run needs at least 1 model")
  on_cpu = platform == "cpu"
  if margin is None:
    margin = CPU_MARGIN if on_cpu else ACCELERATOR_MARGIN
  if not 0 < margin <= 1:
    raise ValueError(f"margin={margin}; expected a share of memory in (0, 1]")
  largest, limited_by = n_models, "models"
  if bytes_per_model > 0 and available > 0:
    budget = available * margin
    fit = math.floor(budget / bytes_per_model)
    if fit < 1:
      raise MemoryPlanError(
        f"a model needs about {describe_bytes(bytes_per_model)} but {describe_bytes(budget)} is available "
        f"({margin:.0%} of {describe_bytes(available)}); lower train.batch_size or features.max_seconds, "
        "or use model.compute_dtype=bfloat16 on an accelerator"
      )
    if fit < largest:
      largest, limited_by = fit, "memory"
  if 0 < at_most < largest:
    largest, limited_by = at_most, "setting"
  # As few chunks as `largest` allows, and as even as they can be: 18 models, at most 17
  # at once, train as 9 + 9, not 17 + 1.
  n_chunks = math.ceil(n_models / largest)
  per_chunk = math.ceil(n_models / n_chunks)
  return ChunkPlan(
    n_models=n_models,
    models_per_chunk=per_chunk,
    n_chunks=n_chunks,
    bytes_per_chunk=per_chunk * max(bytes_per_model, 0),
    available=max(available, 0),
    limited_by=limited_by,
  )


def plan_models_per_program(
  n_models: int,
  at_most: int,
  program_bytes: Callable[[int], int],
  reserved_bytes: int = 0,
  platform: str | None = None,
) -> tuple[int, ChunkPlan]:
  """(models per program, the plan): as many of `n_models` as fit, read from the largest
  program, which the run then calls; a smaller one is measured only where it does not fit.

  at_most: train.models_per_program's bound (1 for one model at a time); 0: none.
  program_bytes: k -> bytes a program of k models needs (compiling it on demand).
  reserved_bytes: memory the run holds apart from the programs (features on the device).
  """
  largest = min(at_most or n_models, n_models)
  per_program = math.ceil(n_models / math.ceil(n_models / largest))  # Even chunks.
  while True:
    plan = plan_chunks(
      n_models,
      math.ceil(program_bytes(per_program) / per_program),
      max(available_bytes() - reserved_bytes, 0),
      platform or jax.default_backend(),
      at_most=at_most,
    )
    if plan.models_per_chunk >= per_program:
      return per_program, plan
    per_program = plan.models_per_chunk  # The larger program did not fit.


# Share of the memory the run can use that the features may take on the device; with no
# figure for it, features up to this many bytes go there.
DEVICE_ROWS_SHARE = 0.5
DEVICE_ROWS_UNKNOWN_BUDGET = 2 * GiB


def rows_on_device(setting: str, n_rows: int, feature_shape) -> int | None:
  """How many rows the features take on the device (data.on_device: 'auto', 'always' or
  'never'), or None: batches stream from the store."""
  n_bytes = n_rows * math.prod(feature_shape) * 4
  if setting == "never":
    return None
  if jax.process_count() > 1:  # Each process reads its share of every batch from disk.
    if setting == "always":
      logging.warning("data.on_device='always' ignored: batches stream in multi-process runs")
    return None
  available = available_bytes()
  budget = DEVICE_ROWS_SHARE * available if available else DEVICE_ROWS_UNKNOWN_BUDGET
  if setting == "auto" and n_bytes > budget:
    logging.info(
      "Features stream from the store: %s exceed the device budget of %s",
      describe_bytes(n_bytes),
      describe_bytes(budget),
    )
    return None
  return n_rows


def group_cells(folds: Sequence[int], n_members: int, models_per_program: int):
  """The (fold, members range) cells of a run, grouped into programs of at most
  `models_per_program` models: whole folds together where a program holds all the
  members, else even chunks of one fold's members. Groups are as even as they can be.
  """
  if models_per_program >= n_members:
    folds_per_group = models_per_program // n_members
    n_groups = math.ceil(len(folds) / folds_per_group)
    size = math.ceil(len(folds) / n_groups)
    members = range(n_members)
    return [
      [(fold, members) for fold in folds[start : start + size]]
      for start in range(0, len(folds), size)
    ]
  chunks = layout.split_members(n_members, models_per_program)
  return [[(fold, chunk)] for fold in folds for chunk in chunks]


def describe_bytes(n_bytes: float) -> str:
  """'2.6 GiB', or '340 MiB' below a GiB."""
  if n_bytes < GiB:
    return f"{n_bytes / 2**20:.0f} MiB"
  return f"{n_bytes / GiB:.1f} GiB"
