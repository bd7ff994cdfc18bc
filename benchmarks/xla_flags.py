"""XLA:CPU options against ser_jax's train and eval steps, each in a fresh process.

Runs bench_steps.py once per flag set and round (round-robin, so background load
spreads over all sets) and prints each set's median samples/s and its ratio to the
default flags.

  python benchmarks/xla_flags.py --kind mfcc --batch 32 --rounds 2
  python benchmarks/xla_flags.py --sets default,ynn_off --variants base,fast
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

FLAG_SETS = {
  "default": "",
  # YNNPACK is XLA:CPU's default library for dots, convolutions and reductions here.
  "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
  "ynn_no_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  "ynn_no_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
  "ynn_no_reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
  "xnn_conv": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution"
  ),
  "xnn_conv_no_reduce": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution"
  ),
  "xnn_conv_dot": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot"
  ),
  "xnn_conv_ynn_off": (
    "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution"
  ),
  "xnn_conv_conc_sched": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution "
    "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  ),
  "xnn_conv_no_conc_sched": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  ),
  "xnn_conv_1thread_eigen": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution "
    "--xla_cpu_multi_thread_eigen=false"
  ),
  "onednn": (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution"
  ),
  "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
  "no_thunks": "--xla_cpu_use_thunk_runtime=false",
  "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
  "vector256": "--xla_cpu_prefer_vector_width=256",
  "vector512": "--xla_cpu_prefer_vector_width=512",
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--sets", default="default,ynn_off,ynn_no_conv,xnn_conv,onednn")
  parser.add_argument("--variants", default="base")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  here = pathlib.Path(__file__).parent
  names = args.sets.split(",")
  results: dict[tuple[str, str, str], list[float]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(args.rounds):
      for name in names:
        out = pathlib.Path(tmp) / f"{name}_{round_}.json"
        env = dict(os.environ, XLA_FLAGS=FLAG_SETS[name])
        cmd = [
          sys.executable,
          str(here / "bench_steps.py"),
          f"--kind={args.kind}",
          f"--batch={args.batch}",
          f"--reps={args.reps}",
          f"--steps={args.steps}",
          f"--variants={args.variants}",
          f"--json={out}",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
          print(f"{name}: failed\n{proc.stderr[-2000:]}")
          continue
        for r in json.loads(out.read_text())["results"]:
          key = (name, r["variant"], r["step"])
          results.setdefault(key, []).extend(r["values"])
        print(f"round {round_} {name} done", flush=True)
  print(f"\n{args.kind} batch {args.batch}: samples/s, median of {args.rounds} x {args.reps} reps")
  print(
    f"{'flags':14s} {'variant':10s} {'step':5s} {'samples/s':>9s} {'vs default':>10s}  XLA_FLAGS"
  )
  for (name, variant, step), values in results.items():
    ref = results.get(("default", variant, step))
    ratio = statistics.median(values) / statistics.median(ref) if ref else float("nan")
    print(
      f"{name:14s} {variant:10s} {step:5s} {statistics.median(values):9.1f} {ratio:10.2f}  "
      f"{FLAG_SETS[name]}"
    )


if __name__ == "__main__":
  main()
