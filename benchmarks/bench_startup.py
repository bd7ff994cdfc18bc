"""A run's fixed costs: `python -m ser_jax.main` on a small demo corpus with every cache warm.

Runs a tiny run (2 folds, 1 epoch, a width-4 ResNet-10 on 1 s MFCCs of 320 clips) once to
fill the caches (feature store, compiled programs, the oneDNN self-test), then --repeats
times in fresh workdirs, and prints each warm run's wall and CPU seconds and where the wall
went, read from the log's timestamps: start-up (imports, JAX), the feature store and the
programs (compiled in a thread beside it, here loaded from the cache), training and testing,
and writing the results (figures, tables) until the process ends.

  python benchmarks/bench_startup.py --dir /tmp/startup --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import resource
import shutil
import sys
import time

import common

from ser_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = {
  "model.name": "resnet10",
  "model.width": 4,
  "features.max_seconds": 1.0,
  "train.num_epochs": 1,
  "cv.n_folds": 2,
  "data.num_workers": 1,
}
# Log lines that end each phase, in order.
MARKS = {
  "start-up": "JAX devices:",
  "store and programs": "Program evaluation",
  "training and testing": "Result over",
}


def _log_time(line: str) -> float:
  stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
  return stamp.timestamp()


def phases(log: str, started: float, ended: float) -> dict[str, float]:
  """Seconds of each phase of MARKS, then 'results' to the process's end."""
  seconds, last = {}, started
  lines = log.splitlines()
  for phase, mark in MARKS.items():
    line = next(line for line in lines if mark in line)
    seconds[phase] = _log_time(line) - last
    last = _log_time(line)
  seconds["results"] = ended - last
  return seconds


def run_once(args, out: pathlib.Path, name: str, env: dict) -> dict:
  workdir, log_path = out / name, out / f"{name}.log"
  shutil.rmtree(workdir, ignore_errors=True)
  command = [
    sys.executable,
    "-m",
    "ser_jax.main",
    f"--config={REPO / 'configs' / 'demo.py'}",
    f"--workdir={workdir}",
    f"--config.data.root={out / 'corpus'}",
    f"--config.data.cache_dir={out / 'cache'}",
    *[f"--config.{key}={value}" for key, value in SETTINGS.items()],
  ]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  started = time.time()
  status = common.run_process(command, log_path, env, timeout=args.timeout, cwd=REPO)
  ended = time.time()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if status != "ok":
    sys.exit(f"{name} failed ({status}): see {log_path}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"wall": ended - started, "cpu": cpu, **phases(log_path.read_text(), started, ended)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", type=pathlib.Path, required=True)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--timeout", type=float, default=900)
  args = parser.parse_args()
  out = args.dir.resolve()
  for name in ("xla", "home", "cache"):
    shutil.rmtree(out / name, ignore_errors=True)
  out.mkdir(parents=True, exist_ok=True)
  demo.write_demo_corpus(out / "corpus")
  env = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(out / "xla"),
    "SER_JAX_CACHE": str(out / "home"),
    "MPLCONFIGDIR": str(out / "home" / "matplotlib"),
  }
  print(common.machine_line())
  cold = run_once(args, out, "cold", env)
  print(f"cold (empty caches): {cold['wall']:.1f} s wall, {cold['cpu']:.1f} s CPU")
  warm = [run_once(args, out, f"warm_{i}", env) for i in range(args.repeats)]
  for key in warm[0]:
    values = [run[key] for run in warm]
    print(f"warm {key}: {common.summary(values)} s")


if __name__ == "__main__":
  main()
