"""Wall time of the paper's Table 4 (four configs x 5 folds) on an IEMOCAP-sized corpus.

Writes a synthetic demo-format corpus (2,280 utterances in IEMOCAP's four-class shares,
10 speakers) unless --root names a real one, runs `python -m ser_jax.main` for each
config, and prints each run's wall time, WA and UA, the total, and ser_jax.report's table.

One config at a time (the default), feature extraction is part of the first config of each
input kind. With --parallel N, the feature stores are built first (timed on their own) and
then N configs train at once, each logging to <dir>/<config>.log; on one accelerator, one
ResNet-18 at batch 32 leaves most of it idle, and each process gets 1/N of its memory.
Compiled programs are kept in <dir>/xla: configs that share a program compile it once.
--lowering sets model.lowering for every config (default: theirs, 'auto'); each run
logs the lowering it took ("Lowering: ..."), and the table shows it where results.json
records it.

  python benchmarks/bench_table4.py --dir /tmp/table4                 # the whole table
  python benchmarks/bench_table4.py --dir /tmp/table4 --parallel 4    # on one GPU
  python benchmarks/bench_table4.py --dir /tmp/t4 --utterances 80 \\
    --set train.num_epochs=1 --set model.width=8                       # a quick check
  python benchmarks/bench_table4.py --dir /tmp/t4 --corpus iemocap --root /data/IEMOCAP_full_release
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import common

from ser_jax import run_results
from ser_jax.cpu import LOWERINGS
from ser_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ("mfcc_focal", "mfcc_softmax", "logmel_focal", "logmel_softmax")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="workdirs, feature cache and corpus go here")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--corpus", default="demo", help="a corpus name; 'demo' is synthesised")
  parser.add_argument("--root", default="", help="the corpus folder (default: synthesise one)")
  parser.add_argument("--utterances", type=int, default=2280, help="size of the synthetic corpus")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  parser.add_argument("--parallel", type=int, default=1, help="configs trained at once")
  parser.add_argument(
    "--lowering", choices=LOWERINGS, help="model.lowering (default: the configs')"
  )
  args = parser.parse_args()
  # No JAX in this process: the runs are children, and on a GPU this one would hold memory.
  print(f"cpu {common.cpu_model()!r} x {os.cpu_count()} ({common.cpu_isa()})")
  out = pathlib.Path(args.dir).resolve()
  # Compiled programs go to <dir>/xla, so a new --dir times the table from a cold start.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla"))
  root = args.root
  if not root:
    start = time.perf_counter()
    root = str(demo.write_demo_corpus(out / "corpus", n_utterances=args.utterances, n_speakers=10))
    print(f"synthetic corpus: {args.utterances} utterances in {time.perf_counter() - start:.0f} s")
  overrides = [
    f"--config.data.corpus={args.corpus}",
    f"--config.data.root={root}",
    f"--config.data.cache_dir={out / 'cache'}",
    *([f"--config.model.lowering={args.lowering}"] if args.lowering else []),
    *[f"--config.{item}" for item in args.set],
  ]
  names = args.configs.split(",")
  workdirs = {name: out / name for name in names}
  commands = {
    name: [sys.executable, "-m", "ser_jax.main", f"--config={REPO / 'configs' / f'{name}.py'}"]
    + [f"--workdir={workdirs[name]}", "--fresh", *overrides]
    for name in names
  }
  start = time.perf_counter()
  if args.parallel > 1:
    walls = _run_parallel(commands, out, overrides, args.parallel)
  else:
    walls = {}
    for name in names:
      began = time.perf_counter()
      subprocess.run(commands[name], check=True, cwd=REPO)
      walls[name] = time.perf_counter() - began
  total = time.perf_counter() - start
  rows = []
  for name in names:
    results = run_results.read(workdirs[name])
    lowering = (results.provenance or {}).get("lowering") or "(see its log)"
    model = results.members[0]
    rows.append((name, walls[name], model.wa_fold_mean, model.ua_fold_mean, lowering))
  print(f"\n{'config':16s} {'wall s':>8s} {'WA':>6s} {'UA':>6s}  lowering")
  for name, wall, wa, ua, lowering in rows:
    print(f"{name:16s} {wall:8.0f} {wa:6.2f} {ua:6.2f}  {lowering}")
  print(f"{'total':16s} {total:8.0f}")
  report = [sys.executable, "-m", "ser_jax.report", *map(str, workdirs.values())]
  subprocess.run(report, check=True, cwd=REPO)


def _run_parallel(commands, out, overrides, parallel) -> dict[str, float]:
  """Builds the feature stores one config at a time, then trains `parallel` configs at once."""
  start = time.perf_counter()
  for name in commands:  # A config whose store is already built finds it in the cache.
    cmd = [
      sys.executable,
      "-m",
      "ser_jax.preprocess",
      f"--config={REPO / 'configs' / f'{name}.py'}",
    ]
    subprocess.run([*cmd, *overrides], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  walls = {"features": time.perf_counter() - start}
  print(f"feature stores: {walls['features']:.0f} s")
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.2f}")
  pending, running = list(commands), {}
  while pending or running:
    while pending and len(running) < parallel:
      name = pending.pop(0)
      log = open(out / f"{name}.log", "w")
      process = subprocess.Popen(commands[name], cwd=REPO, env=env, stdout=log, stderr=log)
      running[name] = (process, log, time.perf_counter())
    time.sleep(1)
    for name, (process, log, began) in list(running.items()):
      if process.poll() is not None:
        log.close()
        del running[name]
        if process.returncode:
          raise SystemExit(f"{name} failed (exit {process.returncode}); see {out / name}.log")
        walls[name] = time.perf_counter() - began
        print(f"{name}: {walls[name]:.0f} s")
  return walls


if __name__ == "__main__":
  main()
