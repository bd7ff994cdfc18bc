"""ser_jax and the same protocol in PyTorch on one corpus: walls, steady samples/s, ratios.

Runs `python -m ser_jax.main` (configs/mfcc_focal.py unless --config) twice in fresh
workdirs: first with empty caches (feature store, compiled programs, ser_jax's own under
$SER_JAX_CACHE), then with them warm. Then benchmarks/torch_protocol.py on the same
store, folds and batch order, each --torch-modes mode --torch-runs times (a fresh
TorchInductor cache before the first). Every run is its own process and its wall is
that process's, start to exit. Steady samples/s are training samples over the seconds of
every fold's epochs but its first (metrics.jsonl of either). `--set key=value` goes to
both (ser_jax as --config.key=value).

  python benchmarks/side_by_side.py --dir /tmp/sbs --utterances 80 \\
    --set train.num_epochs=2 --set model.width=8                       # a quick check
  python benchmarks/side_by_side.py --dir /tmp/sbs --corpus emodb --root ../shared/data/emodb \\
    --set features.max_seconds=2.0 --torch-modes eager,compile          # EmoDB-4
  python benchmarks/side_by_side.py --dir /tmp/sbs --utterances 2280    # IEMOCAP-sized demo

Everything goes under --dir: corpus/ (the synthetic one), cache/ (feature stores), xla/,
home/ ($SER_JAX_CACHE), inductor/, and per run <name>/ (workdir) and <name>.log. The
caches are emptied at the start, so the first run is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import common

from ser_jax import layout, run_results
from ser_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHES = ("cache", "xla", "home", "inductor")


def run(name: str, command: list[str], out: pathlib.Path, env: dict, timeout: float) -> dict:
  """Runs one process with its output in <out>/<name>.log; {name, wall_seconds, status, log}."""
  log_path = out / f"{name}.log"
  log_path.unlink(missing_ok=True)
  print(f"{name}: {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  status = common.run_process(command, log_path, env, timeout, cwd=REPO)
  wall = time.perf_counter() - start
  if status != "ok":
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    print(f"{name} failed ({status}); the end of {log_path}:\n  " + "\n  ".join(tail))
  return {"name": name, "wall_seconds": wall, "status": status, "log": str(log_path)}


def read_run(row: dict, workdir: pathlib.Path, batch_size: int) -> dict:
  """Adds WA, UA, per-fold metrics, training seconds and steady samples/s from a workdir."""
  if not (workdir / layout.RESULTS).exists():
    return row
  results = run_results.read(workdir)
  model = results.members[0]
  metrics_path = workdir / "metrics.jsonl"
  records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  return row | {
    "workdir": str(workdir),
    "wa": model.wa_fold_mean,
    "ua": model.ua_fold_mean,
    "folds": [
      {"fold": f.fold, "wa": f.wa, "ua": f.ua, "confusion_counts": f.confusion_counts}
      for f in model.folds
    ],
    "train_seconds": sum(r["seconds"] for r in records),
    "steady_samples_per_second": common.steady_samples_per_second(records, batch_size),
    "mode": (results.provenance or {}).get("lowering"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="corpus, caches, workdirs and logs go here")
  parser.add_argument("--config", default=str(REPO / "configs" / "mfcc_focal.py"))
  parser.add_argument("--corpus", default="demo", help="a corpus name; 'demo' is synthesised")
  parser.add_argument("--root", default="", help="the corpus folder (default: synthesise one)")
  parser.add_argument("--utterances", type=int, default=320, help="size of the synthetic corpus")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  parser.add_argument("--jax-runs", type=int, default=2, help="1: the cold run only")
  parser.add_argument("--torch-modes", default="eager", help="eager, bf16, compile; '' for none")
  parser.add_argument("--torch-runs", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed each run")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()
  # No JAX in this process: the runs are children, and on a GPU this one would hold memory.
  print(f"cpu {common.cpu_model()!r} x {os.cpu_count()} ({common.cpu_isa()})")
  out = pathlib.Path(args.dir).resolve()
  for name in CACHES:
    shutil.rmtree(out / name, ignore_errors=True)
  out.mkdir(parents=True, exist_ok=True)
  root = args.root
  if not root and args.corpus != "demo":
    parser.error(f"--corpus {args.corpus} needs --root (only 'demo' is synthesised)")
  if not root:
    n = args.utterances
    root = str(demo.write_demo_corpus(out / f"corpus_{n}", n_utterances=n, n_speakers=10))
  overrides = [
    f"data.corpus={args.corpus}",
    f"data.root={pathlib.Path(root).resolve()}",
    f"data.cache_dir={out / 'cache'}",
    *args.set,
  ]
  config = common.load_config(args.config, overrides)  # A bad key fails here, before any run.
  env = dict(os.environ)
  env |= {
    "JAX_COMPILATION_CACHE_DIR": str(out / "xla"),
    "SER_JAX_CACHE": str(out / "home"),
    "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor"),
    "PYTHONUNBUFFERED": "1",
  }
  rows = []

  def save(rows: list[dict]) -> None:  # After every run: a later timeout keeps the figures.
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps({"runs": rows}, indent=1))

  for k in range(1, args.jax_runs + 1):
    name = f"ser_jax_{k}"
    shutil.rmtree(out / name, ignore_errors=True)
    command = [sys.executable, "-m", "ser_jax.main", f"--config={args.config}"]
    command += [f"--workdir={out / name}", *[f"--config.{item}" for item in overrides]]
    row = run(name, command, out, env, args.timeout)
    rows.append(read_run(row, out / name, config.train.batch_size))
    save(rows)
  modes = [m for m in args.torch_modes.split(",") if m]
  for mode in modes:
    for k in range(1, args.torch_runs + 1):
      name = f"torch_{mode}_{k}"
      shutil.rmtree(out / name, ignore_errors=True)
      command = [sys.executable, str(REPO / "benchmarks" / "torch_protocol.py")]
      command += [f"--config={args.config}", f"--workdir={out / name}", f"--mode={mode}"]
      command += [f"--set={item}" for item in overrides]
      row = run(name, command, out, env, args.timeout)
      rows.append(read_run(row, out / name, config.train.batch_size))
      save(rows)
  print_table(rows)


def print_table(rows: list[dict]) -> None:
  print(
    f"\n{'run':18s} {'wall s':>8s} {'train s':>8s} {'steady samples/s':>16s} "
    f"{'WA':>6s} {'UA':>6s}  status"
  )
  nan = float("nan")
  for r in rows:
    print(
      f"{r['name']:18s} {r['wall_seconds']:8.1f} {r.get('train_seconds', nan):8.1f} "
      f"{r.get('steady_samples_per_second', nan):16.1f} {r.get('wa', nan):6.2f} "
      f"{r.get('ua', nan):6.2f}  {r['status']}" + (f" ({r['mode']})" if r.get("mode") else "")
    )
  by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
  jax_runs = [n for n in by_name if n.startswith("ser_jax_")]
  torch_runs = [n for n in by_name if n.startswith("torch_")]
  if not (jax_runs and torch_runs):
    return
  print("\nratios, PyTorch / ser_jax (above 1: ser_jax faster):")
  for t in torch_runs:
    torch_row = by_name[t]
    walls = ", ".join(
      f"{torch_row['wall_seconds'] / by_name[j]['wall_seconds']:.2f} vs {j}" for j in jax_runs
    )
    rates = ", ".join(
      f"{by_name[j]['steady_samples_per_second'] / torch_row['steady_samples_per_second']:.2f}"
      f" ({j})"
      for j in jax_runs
    )
    print(f"  {t}: wall {walls}; steady samples/s ser_jax / torch {rates}")


if __name__ == "__main__":
  common.end_on_sigterm()
  main()
