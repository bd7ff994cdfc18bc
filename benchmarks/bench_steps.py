"""Throughput of ser_jax's real train and eval steps on this machine.

Builds the steps through experiment.Programs (as a run does), then reports samples/s
(median [min-max] of --reps repetitions after warm-up), compile time, model FLOPs per
step (XLA's cost_analysis of the steps lowered with the 'xla' lowering), achieved
GFLOP/s against the machine's practical peak (the faster of a 4096x4096 jnp.dot and, on
CPU, oneDNN's sgemm, timed in the same run), XLA's buffer sizes and the
process's peak RSS.

--lowering takes one lowering or several, comma-separated ('auto', as a run chooses it,
'xla', 'cpu', 'onednn'; see ser_jax/cpu/__init__.py); several run in the same process,
alternated repetition by repetition.

  python benchmarks/bench_steps.py --kind mfcc --batch 32
  python benchmarks/bench_steps.py --kind mfcc --batch 32 --lowering onednn,cpu --no-eval
"""

from __future__ import annotations

import argparse
import json
import time

import common

from ser_jax import cpu


def _memory_line(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    return (
      f"args {m.argument_size_in_bytes / 2**20:.0f} MiB, temp {m.temp_size_in_bytes / 2**20:.0f} "
      f"MiB, out {m.output_size_in_bytes / 2**20:.0f} MiB"
    )
  except Exception as error:  # Not every backend reports it.
    return f"n/a ({type(error).__name__})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=sorted(common.N_BINS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="steps per repetition")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--lowering",
    default=["auto"],
    type=common.lowerings,
    help=f"comma-separated, each one of: {', '.join(cpu.LOWERINGS)}",
  )
  parser.add_argument("--no-eval", action="store_true")
  parser.add_argument("--json", default="", help="also write the results to this file")
  parser.add_argument("--n-frames", type=int, default=common.N_FRAMES, help="input width")
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="the device's peak for --dtype (e.g. H100 SXM dense: 989 bfloat16; float32 "
    "runs as TF32 on a GPU by default, 495); "
    "adds model FLOPs utilisation (XLA's FLOP count / step time / peak)",
  )
  args = parser.parse_args()
  common.N_FRAMES = args.n_frames
  print(common.machine_line())
  config = common.make_config(args.kind, args.batch, args.dtype, args.width)
  names = list(dict.fromkeys(args.lowering))
  train_flops, eval_flops = common.model_flops(
    config, common.synthetic_batch(args.kind, args.batch)
  )
  runners, info, taken, labels = {}, {}, {}, {}
  for name in names:
    backend = common.select_backend(config, name)
    print(common.lowering_line(name, backend))
    taken[name] = backend.lowering
    labels[name] = name if backend.lowering == name else f"{name}->{backend.lowering}"
    steps = common.build_steps(config, backend)
    runner = common.JaxRunner(steps, common.synthetic_batch(args.kind, args.batch))
    batch = steps.topology.global_batch(runner.batch_np)
    train_s, train_c = common.compile_seconds(steps.train_step, steps.state, batch, steps.hparams)
    eval_s, eval_c = common.compile_seconds(steps.eval_step, *runner.eval_arguments())
    info[name] = {
      "train": (train_s, train_flops, _memory_line(train_c)),
      "eval": (eval_s, eval_flops, _memory_line(eval_c)),
    }
    runner.train_many(args.warmup)
    if not args.no_eval:
      runner.eval_many(args.warmup)
    runners[name] = runner
  modes = ("train",) if args.no_eval else ("train", "eval")
  rates = {(n, m): common.Samples() for n in names for m in modes}
  peaks = common.Peaks()
  for _ in range(args.reps):
    peaks.measure()
    for name in names:
      for mode in modes:
        run = runners[name].train_many if mode == "train" else runners[name].eval_many

        def rate(run=run):
          start = time.perf_counter()
          run(args.steps)
          return args.batch * args.steps / (time.perf_counter() - start)

        rates[(name, mode)].measure(rate)
  peak = peaks.best
  print(
    f"\n{args.kind} batch {args.batch} {args.dtype} width {args.width}: {args.reps} reps x "
    f"{args.steps} steps; {peaks}"
  )
  header = (
    f"{'lowering':14s} {'step':5s} {'samples/s median [min-max], clean reps, load':>46s} "
    f"{'ms/step':>8s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'of peak':>7s} {'MFU':>5s} "
    f"{'compile s':>9s}"
  )
  print(header)
  print("-" * len(header))
  results = []
  for name in names:
    for mode in modes:
      samples = rates[(name, mode)]
      median = samples.median
      compile_s, flops, memory = info[name][mode]
      gflops = flops / 1e9 * median / args.batch
      mfu = f"{gflops / (10 * args.peak_tflops):4.1f}%" if args.peak_tflops else "-"
      print(
        f"{labels[name]:14s} {mode:5s} {samples!s:>46s} {1e3 * args.batch / median:8.1f} "
        f"{flops / 1e9:10.1f} {gflops:8.1f} {100 * gflops / peak:6.0f}% {mfu:>5s} {compile_s:9.1f}"
      )
      results.append(
        {
          "lowering": name,
          "lowering_taken": taken[name],
          "step": mode,
          "samples_per_s": median,
          "values": samples.values,
          "foreign_load": samples.loads,
          "gflop_per_step": flops / 1e9,
          "compile_s": compile_s,
          "peak_gflops": peak,
          "mfu": gflops / (1e3 * args.peak_tflops) if args.peak_tflops else None,
          "memory": memory,
        }
      )
  print("\nXLA buffers:")
  for name in names:
    for mode in modes:
      print(f"  {labels[name]:14s} {mode:5s} {info[name][mode][2]}")
  print(f"peak RSS of this process: {common.peak_rss_mb():.0f} MiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "args": vars(args),
          "machine": common.machine_line(),
          "peak_rss_mib": common.peak_rss_mb(),
          "results": results,
        },
        f,
      )


if __name__ == "__main__":
  cpu.tune_process()  # Before JAX starts, as `python -m ser_jax.main` does.
  main()
