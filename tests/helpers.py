"""Shared by the end-to-end tests: a tiny demo config and running the entry points."""

from __future__ import annotations

import collections
import os
import pathlib
import struct
import subprocess
import sys

from ser_jax import run_results

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compilation is most of the tests' time. XLA's backend at -O0 compiles about twice as
# fast with the same values (tests compare values, not speed); conftest.py sets it for the
# test process too, and points JAX's persistent cache at the session's folder, where the
# test processes and their subprocesses share every compiled program.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
TEST_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": TEST_XLA_FLAGS}


def session_demo_corpus() -> pathlib.Path:
  """Where the test session's demo corpus goes: written once, by the first run that reads it
  (ser_jax.data.demo.write_demo_corpus is safe for runs that start together)."""
  return pathlib.Path(os.environ["SER_JAX_TEST_SESSION_FOLDER"]) / "demo_corpus"


def tiny_args(workdir, cache_dir, **overrides) -> list[str]:
  """Flags for a demo run that trains for seconds: a narrow ResNet-10 (the paper's ResNet-18
  with one block a stage, tracing and compiling in about half the time) on 1 s MFCCs of the
  session's demo corpus, with its feature stores in `cache_dir`; checkpoints after the last
  epoch only (the demo config's every 4)."""
  settings = {
    "data.root": str(session_demo_corpus()),
    "model.name": "resnet10",
    "model.width": 4,
    "features.max_seconds": 1.0,
    "train.num_epochs": 3,
    "train.warmup_epochs": 1,
    "cv.n_folds": 2,
    "data.num_workers": 1,
    "data.cache_dir": str(cache_dir),
  }
  settings.update(overrides)
  return [
    "--config=" + str(REPO / "configs" / "demo.py"),
    f"--workdir={workdir}",
    *[f"--config.{key}={value}" for key, value in settings.items()],
  ]


def with_test_xla_flags(xla_flags: str) -> str:
  """xla_flags after TEST_XLA_FLAGS (a later flag wins)."""
  return f"{TEST_XLA_FLAGS} {xla_flags}".strip()


def _environment(env: dict | None) -> dict:
  """os.environ with TEST_ENV and `env` on top; a None value in `env` removes that variable.
  XLA_FLAGS are TEST_XLA_FLAGS, then the session's own (such as --xla_cpu_max_isa=AVX2, to
  test as an AVX2 machine would), then those in `env`."""
  env = dict(env or {})
  session_flags = os.environ.get("XLA_FLAGS") or TEST_XLA_FLAGS  # conftest.py's: tests' first.
  if env.get("XLA_FLAGS", "") is not None:
    env["XLA_FLAGS"] = f"{session_flags} {env.get('XLA_FLAGS', '')}".strip()
  merged = {**os.environ, **TEST_ENV, **env}
  return {key: value for key, value in merged.items() if value is not None}


def run_module(module: str, args: list[str], env: dict | None = None, **kwargs):
  """Runs `python -m module args` from the repository root; returns the CompletedProcess."""
  return run_python(["-m", module, *args], env, **kwargs)


def run_code(code: str, env: dict | None = None):
  """Runs `python -c code` with the test environment; returns the CompletedProcess."""
  return run_python(["-c", code], env)


def run_python(args: list[str], env: dict | None = None, **kwargs):
  """Runs `python args` from the repository root with the test environment."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=_environment(env),
    capture_output=True,
    text=True,
    **kwargs,
  )


def start_module(
  module: str, args: list[str], env: dict | None = None, output: pathlib.Path | None = None
) -> subprocess.Popen:
  """Starts `python -m module args`; its stdout and stderr go to pipes, or both to `output`."""
  command, environment = [sys.executable, "-m", module, *args], _environment(env)
  if output is None:
    return subprocess.Popen(
      command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
  with open(output, "w") as log:  # The child keeps its own copy of the file.
    return subprocess.Popen(
      command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def result_metrics(workdir) -> dict:
  """The numbers of results.json that must not depend on interruptions or timing."""
  results = run_results.read(workdir)
  return {
    "members": [
      (m.hyperparameters(), [(f.fold, f.n_train, f.confusion_counts) for f in m.folds])
      for m in results.members
    ],
  }


def randomised_batch_norms(variables, key):
  """Every BatchNorm scale, bias and running statistic random, so that every layer gets a
  gradient (a block's last scale starts at zero) and every fused term counts."""
  import jax

  leaves, tree = jax.tree.flatten_with_path(variables)
  out = []
  for (path, leaf), k in zip(leaves, jax.random.split(key, len(leaves)), strict=True):
    name = path[-1].key
    if name in ("scale", "var"):
      leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
    elif name in ("bias", "mean"):
      leaf = 0.2 * jax.random.normal(k, leaf.shape)
    out.append(leaf)
  return jax.tree.unflatten(tree, out)


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of the event files in `logdir` as TensorBoard shows them, read
  as TFRecords (length, its CRC, the Event proto, its CRC) with tensorboardX's proto, not
  its writer. As TensorBoard does, a SessionLog START at step T hides what earlier events
  logged from step T on."""
  from tensorboardX.proto import event_pb2

  scalars = collections.defaultdict(list)
  for path in sorted(logdir.glob("events.out.tfevents.*")):  # The oldest first.
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        for tag, points in scalars.items():
          scalars[tag] = [(step, value) for step, value in points if step < event.step]
      for value in event.summary.value:
        scalars[value.tag].append((event.step, value.simple_value))
  return dict(scalars)
