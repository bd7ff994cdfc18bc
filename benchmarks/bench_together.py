"""K models (folds, sweep members) trained one at a time, vmapped, and under lax.map.

  python benchmarks/bench_together.py --models 5 --width 16 --n_frames 130 --steps 8
  python benchmarks/bench_together.py --models 5 --width 64 --lowering xla

Each way runs ser_jax's real programs (programs.Programs, as a run builds them) for one
epoch on the device: `steps` optimiser steps per model on its own batches, the features
put on the device once. The figures are samples/s over all models, compilation excluded
(median of --repeats epochs), their ratios to one at a time, and each program's compile
seconds and XLA memory.
"""

from __future__ import annotations

import argparse
import functools
import time

import common
import jax
import numpy as np

from ser_jax import cpu, engine, memory, models, programs
from ser_jax.config import default_config
from ser_jax.sharding import Topology


def _build(args, config, backend, model, n_models: int, stacking: str, topology):
  shapes = programs.Shapes(
    n_models=n_models,
    n_members=1,
    feature_shape=(args.n_bins, args.n_frames),
    batch_size=args.batch,
    max_steps=args.steps,
    n_rows=args.rows,
    eval_batches=1,
    eval_batch_size=args.batch,
    n_classes=4,
  )
  made = programs.Programs.create(
    shapes,
    model,
    backend,
    programs.Options.from_config(config, stacking),
    topology,
  )
  members = [engine.Member(float(g), 0, 1e-3) for g in np.linspace(0, 5, n_models)]
  hparams = engine.stacked_hparams(config, members, None, 0, args.steps, tuple("abcd"))
  start = time.perf_counter()
  compiled = made.compile(jax.eval_shape(lambda: hparams), topology)
  return compiled, jax.device_put(hparams, topology.replicated), time.perf_counter() - start


def _epoch_seconds(made, hparams, rows, args, first_model: int, topology) -> float:
  k = made.shapes.n_models
  state = made.init(
    *jax.device_put(
      (np.zeros(k, np.uint32), np.arange(first_model, first_model + k, dtype=np.int32))
    )
  )
  rng = np.random.default_rng(first_model)
  order = rng.integers(0, args.rows, (k, args.steps, args.batch)).astype(np.int32)
  inputs = jax.device_put(
    (
      order,
      np.full(k, args.steps, np.int32),
      np.zeros((k, args.n_bins), np.float32),
      np.ones((k, args.n_bins), np.float32),
    ),
    topology.replicated,
  )
  state, metrics = made.train_epoch(state, rows, *inputs, hparams)  # Warm.
  jax.block_until_ready(metrics)
  timings = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, metrics = made.train_epoch(state, rows, *inputs, hparams)
    jax.block_until_ready(metrics)
    timings.append(time.perf_counter() - start)
  return float(np.median(timings))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", type=int, default=5)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--n_bins", type=int, default=40)
  parser.add_argument("--n_frames", type=int, default=130)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--rows", type=int, default=512, help="clips on the device")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lowering", default="auto", choices=cpu.LOWERINGS)
  parser.add_argument("--ways", default="none,vmap,map", help="comma-separated")
  args = parser.parse_args()
  print(common.machine_line())
  config = default_config()
  config.model.width = args.width
  config.train.batch_size = args.batch
  topology = Topology.create()
  input_shape = (args.batch, args.n_bins, args.n_frames, 1)
  make_model = functools.partial(models.create_model, config.model, 4)
  backend = cpu.select_backend(args.lowering, make_model, [input_shape, input_shape])
  print(common.lowering_line(args.lowering, backend))
  model = make_model(backend.ops)
  rng = np.random.default_rng(0)
  rows = jax.device_put(
    {
      "features": rng.normal(size=(args.rows, args.n_bins, args.n_frames)).astype(np.float32),
      "labels": rng.integers(0, 4, args.rows).astype(np.int32),
      "valid_frames": np.full(args.rows, args.n_frames, np.int32),
    },
    topology.replicated,
  )
  print(
    f"input [{args.batch}, {args.n_bins}, {args.n_frames}, 1], width {args.width}, "
    f"{args.models} models x {args.steps} steps"
  )
  samples = args.models * args.steps * args.batch
  results = {}
  for way in args.ways.split(","):
    k = 1 if way == "none" else args.models
    made, hparams, compile_s = _build(args, config, backend, model, k, way, topology)
    seconds = _epoch_seconds(made, hparams, rows, args, 0, topology)
    if way == "none":
      seconds *= args.models  # K programs of one model, one after another.
    results[way] = seconds
    mib = memory.compiled_bytes(made.train_epoch) / 2**20
    print(
      f"{way:5s}: {samples / seconds:8.1f} samples/s  epoch {seconds:7.3f} s  "
      f"compile {compile_s:6.1f} s  train program {mib:7.0f} MiB"
    )
  if "none" in results:
    for way, seconds in results.items():
      print(f"{way} / none: {results['none'] / seconds:.2f}x")


if __name__ == "__main__":
  cpu.tune_process()  # Before JAX starts, as `python -m ser_jax.main` does.
  main()
