"""Shared pieces of the benchmarks: ser_jax's real steps built as experiment.py builds them.

Scripts that time JAX call `ser_jax.cpu.tune_process()` before JAX starts (as
`python -m ser_jax.main` does), so that they time the process a run has.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ser_jax import cpu, engine, models, programs, train
from ser_jax.config import default_config
from ser_jax.cpu import onednn
from ser_jax.sharding import Topology

sys.stdout.reconfigure(line_buffering=True)

N_FRAMES = 259
N_BINS = {"mfcc": 40, "logmel": 128}
N_CLASSES = 4


def make_config(kind: str = "mfcc", batch: int = 32, dtype: str = "float32", width: int = 64):
  config = default_config()
  config.features.kind = kind
  config.train.batch_size = batch
  config.model.compute_dtype = dtype
  config.model.width = width
  return config


def load_config(spec: str, overrides: Sequence[str] = ()):
  """A config file as `--config=` reads it ('path' or 'path:arg'), with `key=value`
  overrides as `--config.key=value` applies them (values read as Python literals, else
  as strings; an int given for a float key becomes a float)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value (e.g. train.num_epochs=2)")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part] if part in node else None
      if node is None:
        break
    if node is None or leaf not in node:
      raise ValueError(f"unknown config key {key!r} in override {item!r}")
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value
  return config


def steady_samples_per_second(records: list[dict], batch_size: int) -> float:
  """Training samples/s over every fold's epochs but its first (compilation, warm-up):
  metrics.jsonl records of ser_jax and of torch_protocol.py alike."""
  steady = [r for r in records if r["epoch"] > 1]
  seconds = sum(r["seconds"] for r in steady)
  samples = sum(r["step"] // r["epoch"] * batch_size for r in steady)
  return samples / seconds if seconds else float("nan")


def run_process(command: list[str], log_path, env=None, timeout: float | None = None, cwd=None):
  """Runs `command` with its output appended to log_path; 'ok', 'exit N' or 'timed out
  after S s'. The process starts a session of its own, so that a timeout, or this process
  ending on SIGTERM (see end_on_sigterm), ends it with every process it started."""
  with open(log_path, "a") as log:
    process = subprocess.Popen(
      command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
      code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      code = None
    finally:
      if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(process.pid, signal.SIGTERM)  # Lets a benchmark end its own runs.
        try:
          process.wait(timeout=5)
        except subprocess.TimeoutExpired:
          os.killpg(process.pid, signal.SIGKILL)
          process.wait()
  return (
    f"timed out after {timeout:.0f} s" if code is None else "ok" if code == 0 else f"exit {code}"
  )


def end_on_sigterm() -> None:
  """SIGTERM raises SystemExit, so that run_process's cleanup ends this process's runs."""
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def lowerings(text: str) -> list[str]:
  """argparse type: comma-separated lowerings, each one of ser_jax.cpu.LOWERINGS."""
  names = text.split(",")
  for name in names:
    if name not in cpu.LOWERINGS:
      raise argparse.ArgumentTypeError(
        f"unknown lowering {name!r}; expected one of: {', '.join(cpu.LOWERINGS)}"
      )
  return names


def select_backend(config, lowering: str) -> cpu.Backend:
  """The backend a run of `config` takes with model.lowering=`lowering`, chosen as
  experiment.py chooses it: 'auto' and 'onednn' only after oneDNN's self-test at this
  config's batch shape."""
  shape = (config.train.batch_size, N_BINS[config.features.kind], N_FRAMES, 1)
  make_model = functools.partial(models.create_model, config.model, N_CLASSES)
  return cpu.select_backend(lowering, make_model, [shape, shape])


def lowering_line(requested: str, backend: cpu.Backend) -> str:
  """What a results line needs to say about the computation: the lowering asked for and
  the one taken, with its library's version."""
  provenance = backend.provenance()
  library = f", oneDNN {provenance['onednn']}" if provenance["onednn"] else ""
  return (
    f"lowering {requested} -> {backend.lowering} (JAX backend {provenance['backend']}{library})"
  )


@dataclasses.dataclass
class Steps:
  """A model-stacked state, hparams and the jitted steps, as a run's programs have them."""

  state: train.TrainState
  hparams: dict
  train_step: Callable  # (state, batch, hparams) -> (state, metrics)
  eval_step: Callable  # (state, batch) -> [models, batch, n_classes]
  topology: Topology


def build_steps(
  config, backend: cpu.Backend, n_train: int = 1824, fold: int = 0, devices=None
) -> Steps:
  """State, hparams, train and eval steps through programs.Programs, as a run builds them
  (one model, batches streamed).

  `backend`: the lowering's (select_backend, or ser_jax.cpu.backend without the self-test);
  `devices` replaces jax.devices().
  """
  topology = Topology.create(devices)
  model = models.create_model(config.model, N_CLASSES, backend.ops)
  made = programs.Programs.create(
    programs.Shapes(
      n_models=1,
      n_members=1,
      feature_shape=(N_BINS[config.features.kind], N_FRAMES),
      batch_size=config.train.batch_size,
      max_steps=1,
      n_rows=None,
      eval_batches=1,
      eval_batch_size=config.train.eval_batch_size,
      n_classes=N_CLASSES,
    ),
    model,
    backend,
    programs.Options.from_config(config),
    topology,
  )
  steps_per_epoch = n_train // config.train.batch_size
  state = made.init(jnp.array([config.seed], jnp.uint32), jnp.array([fold], jnp.int32))
  members = engine.members_of(config)
  classes = tuple(config.data.classes)
  hparams = engine.stacked_hparams(config, members, None, fold, steps_per_epoch, classes)
  return Steps(
    state=state,
    hparams=jax.device_put(hparams, topology.replicated),
    train_step=made.train_step,
    eval_step=jax.jit(lambda state, batch: made.evaluate(state, batch["features"][None])[:, 0]),
    topology=topology,
  )


def synthetic_batch(kind: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A standardised batch as input_pipeline.read_batch returns it."""
  rng = np.random.default_rng(seed)
  return {
    "features": rng.standard_normal((batch, N_BINS[kind], N_FRAMES), dtype=np.float32),
    "labels": rng.integers(0, N_CLASSES, batch).astype(np.int32),
    # Clips of 60 frames (1.4 s; at most a quarter of a short map) up to all of them.
    "valid_frames": rng.integers(min(60, N_FRAMES // 4), N_FRAMES + 1, batch).astype(np.int32),
  }


class JaxRunner:
  """Runs ser_jax's jitted train or eval step the way the experiment loop does."""

  def __init__(self, steps: Steps, batch_np: dict[str, np.ndarray]):
    self.steps = steps
    self.batch_np = batch_np
    self.eval_batch_np = {"features": batch_np["features"]}

  def eval_batch(self):
    return self.steps.topology.global_batch(self.eval_batch_np)

  def eval_arguments(self) -> tuple:
    """eval_step's arguments: state, batch."""
    return self.steps.state, self.eval_batch()

  def train_many(self, n: int) -> None:
    """n steps dispatched back to back, as the epoch loop does, then one wait."""
    s = self.steps
    for _ in range(n):
      s.state, metrics = s.train_step(s.state, s.topology.global_batch(self.batch_np), s.hparams)
    metrics["loss"].block_until_ready()

  def eval_many(self, n: int) -> None:
    s = self.steps
    for _ in range(n):
      out = s.eval_step(s.state, self.eval_batch())
    out.block_until_ready()


def compile_seconds(jitted, *args) -> tuple[float, object]:
  """Lowering + compile wall time and the compiled executable."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return time.perf_counter() - start, compiled


def flops_of(stage) -> float:
  """XLA's FLOP count of a lowered or compiled computation."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def model_flops(config, batch_np) -> tuple[float, float]:
  """FLOPs of one train step and one eval step on `batch_np`: the model's arithmetic.

  Counted on the steps with the 'xla' lowering, lowered for the CPU but not compiled:
  oneDNN's convolutions and, after a GPU backend's passes, cuDNN's are custom calls that
  XLA's cost analysis counts as zero, and GPU plugins do not analyse lowered programs.
  """
  steps = build_steps(config, cpu.backend("xla"), devices=jax.devices("cpu")[:1])
  batch = steps.topology.global_batch(batch_np)
  train = steps.train_step.lower(steps.state, batch, steps.hparams)
  evaluation = steps.eval_step.lower(steps.state, {"features": batch["features"]})
  return flops_of(train), flops_of(evaluation)


def _gflops(run, n: int, reps: int) -> float:
  """GFLOP/s of an n x n x n product from the median time of `reps` calls of run()."""
  run()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e9


def matmul_gflops(n: int = 4096, reps: int = 5) -> float:
  """Achieved GFLOP/s of a float32 n x n jnp.dot (XLA's matmul)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
  dot = jax.jit(jnp.dot)
  return _gflops(lambda: dot(a, a).block_until_ready(), n, reps)


@functools.cache
def _sgemm():
  """oneDNN's dnnl_sgemm through ctypes; None where oneDNN is not installed."""
  try:
    _, lib_dir = onednn.onednn_prefixes()
  except onednn.OneDnnUnavailable:
    return None
  sgemm = ctypes.CDLL(str(lib_dir / "libdnnl.so")).dnnl_sgemm
  size, real, pointer = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
  sgemm.argtypes = [ctypes.c_char, ctypes.c_char, size, size, size, real, pointer, size]
  sgemm.argtypes += [pointer, size, real, pointer, size]
  return sgemm


def sgemm_gflops(n: int = 4096, reps: int = 5) -> float:
  """Achieved GFLOP/s of oneDNN's float32 n x n sgemm, the library that runs ser_jax's
  CPU convolutions (its kernels are the fastest float32 matmul here); nan without it."""
  sgemm = _sgemm()
  if sgemm is None:
    return float("nan")
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  c = np.empty_like(a)
  args = (b"N", b"N", n, n, n, 1.0, a.ctypes.data, n, a.ctypes.data, n, 0.0, c.ctypes.data, n)
  return _gflops(lambda: sgemm(*args), n, reps)


def peak_gflops(reps: int = 3) -> dict[str, float]:
  """The device's practical float32 peak: GFLOP/s of each matmul at hand (on CPU also
  oneDNN's), and the best of them."""
  rates = {"jnp.dot": matmul_gflops(reps=reps)}
  if jax.default_backend() == "cpu":
    rates["oneDNN sgemm"] = sgemm_gflops(reps=reps)
  rates["best"] = max(v for v in rates.values() if not np.isnan(v))
  return rates


class Peaks:
  """peak_gflops() measured once per repetition, between a benchmark's own measurements."""

  def __init__(self):
    self.values = collections.defaultdict(list)

  def measure(self) -> None:
    for name, rate in peak_gflops().items():
      self.values[name].append(rate)

  @property
  def best(self) -> float:
    """The median over repetitions of the best matmul's GFLOP/s: the machine's limit."""
    return statistics.median(self.values["best"])

  def __str__(self) -> str:
    matmuls = (f"{n} {summary(v).strip()}" for n, v in self.values.items() if n != "best")
    return "4096^2 matmul GFLOP/s (median [min-max]): " + ", ".join(matmuls)


def peak_rss_mb() -> float:
  """Peak resident set of this process so far (ru_maxrss), MiB."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _busy_seconds() -> float:
  """CPU seconds all processes have run (from /proc/stat), summed over cores."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_seconds(pid: int) -> float:
  """CPU seconds a running process has used (user + system, from /proc/<pid>/stat)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
  """CPU seconds of this process and its children, finished or still running."""
  t = os.times()
  running = sum(_process_seconds(child.pid) for child in multiprocessing.active_children())
  return t.user + t.system + t.children_user + t.children_system + running


class Foreign:
  """Measures how much CPU other processes took while the block ran (0 = none, 1 = a core).

  The machine is shared: repetitions during which others were busy are flagged and left
  out of the medians when enough clean ones exist.
  """

  def __enter__(self):
    self._start = (time.perf_counter(), _busy_seconds(), _own_seconds())
    return self

  def __exit__(self, *exc):
    wall, busy, own = (
      a - b
      for a, b in zip(
        (time.perf_counter(), _busy_seconds(), _own_seconds()), self._start, strict=True
      )
    )
    self.cores = max(busy - own, 0.0) / max(wall, 1e-9)
    return False


def wait_quiet(threshold: float = 0.2, window: float = 0.5, timeout: float | None = None) -> float:
  """Waits (up to timeout s) until other processes use < threshold cores; returns their use."""
  if timeout is None:
    timeout = float(os.environ.get("BENCH_QUIET_TIMEOUT", "5"))
  deadline = time.perf_counter() + timeout
  while True:
    with Foreign() as f:
      time.sleep(window)
    if f.cores < threshold or time.perf_counter() > deadline:
      return f.cores


class Samples:
  """Repeated measurements with the foreign CPU load seen during each."""

  def __init__(self, threshold: float = 0.25, min_clean: int = 3):
    self.values, self.loads = [], []
    self.threshold, self.min_clean = threshold, min_clean

  def measure(self, fn, quiet: bool = True) -> float:
    """Runs fn() -> value (after waiting for quiet) and records it with its foreign load."""
    if quiet:
      wait_quiet()
    with Foreign() as f:
      value = fn()
    self.values.append(value)
    self.loads.append(f.cores)
    return value

  def clean(self) -> list[float]:
    """The values measured while others used < threshold cores (all, if too few)."""
    kept = [v for v, c in zip(self.values, self.loads, strict=True) if c < self.threshold]
    return kept if len(kept) >= self.min_clean else list(self.values)

  @property
  def n_clean(self) -> int:
    return sum(c < self.threshold for c in self.loads)

  @property
  def median(self) -> float:
    return statistics.median(self.clean())

  def __str__(self) -> str:
    kept = self.clean()
    load = statistics.median(self.loads)
    return f"{summary(kept)} clean {self.n_clean}/{len(self.values)} load {load:.1f}"


def summary(values: list[float]) -> str:
  return f"{statistics.median(values):7.1f} [{min(values):.1f}-{max(values):.1f}]"


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else platform's processor string.

  Ratios against PyTorch differ between CPU models (benchmarks/NOTES.md), so every figure
  names the CPU it was measured on.
  """
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_isa() -> str:
  """The widest vector instruction set this CPU reports that oneDNN tells apart (its
  implementations differ between them: benchmarks/NOTES.md, "Instruction sets"), and
  ONEDNN_MAX_CPU_ISA where set."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
  except OSError:
    flags = []
  wanted = {"avx512_core": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "avx2": ("avx2",)}
  wanted["sse41"] = ("sse4_1",)
  isa = next((name for name, need in wanted.items() if set(need) <= set(flags)), "unknown")
  cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
  return f"{isa}, ONEDNN_MAX_CPU_ISA={cap}" if cap else isa


def machine_line() -> str:
  """The machine and software a figure was measured with, for a script's first line."""
  devices = jax.devices()
  versions = ", ".join(f"{name} {_version(name)}" for name in ("jax", "jaxlib", "flax", "optax"))
  return (
    f"{versions}; {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); "
    f"cpu {cpu_model()!r} x {os.cpu_count()} ({cpu_isa()}), load1 {os.getloadavg()[0]:.2f}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "?"
