"""A K-member gamma sweep in one vmapped program against K sequential single-model runs.

  python benchmarks/bench_sweep.py --members 6 --width 16 --n_frames 130 --steps 8
  python benchmarks/bench_sweep.py --members 6 --lowering cpu

Both sides run ser_jax's real jitted programs (experiment.Programs) with the backend of
--lowering ('auto': the one a run takes) on the same batches; the figure is the wall
time of `steps` optimiser steps per model, compilation excluded.
"""

from __future__ import annotations

import argparse
import functools
import time

import common
import jax
import numpy as np

from ser_jax import cpu, experiment, models
from ser_jax.config import default_config
from ser_jax.sharding import Topology


def _time_steps(programs, members, config, batches, repeats: int) -> float:
  state = programs.init(np.array([m.seed for m in members], np.uint32), 0)
  classes = tuple(config.data.classes)
  hparams = experiment.stacked_hparams(config, members, None, 0, len(batches), classes)
  state, metrics = programs.train_step(state, batches[0], hparams)  # Compiles.
  jax.block_until_ready(metrics)
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    for batch in batches:
      state, metrics = programs.train_step(state, batch, hparams)
    jax.block_until_ready(metrics)
    timings.append(time.perf_counter() - start)
  return float(np.median(timings))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=6)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--n_bins", type=int, default=40)
  parser.add_argument("--n_frames", type=int, default=130)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lowering", default="auto", choices=cpu.LOWERINGS)
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
  gammas = np.linspace(0.0, 5.0, args.members)
  members = [experiment.Member(float(g), 0, 1e-3) for g in gammas]
  rng = np.random.default_rng(0)
  batches = [
    topology.global_batch(
      {
        "features": rng.normal(size=(args.batch, args.n_bins, args.n_frames)).astype(np.float32),
        "labels": rng.integers(0, 4, args.batch).astype(np.int32),
        "valid_frames": np.full(args.batch, args.n_frames, np.int32),
      }
    )
    for _ in range(args.steps)
  ]
  shape = (args.n_bins, args.n_frames)
  single = experiment.Programs.create(config, model, backend, 1, shape, topology)
  stacked = experiment.Programs.create(config, model, backend, args.members, shape, topology)
  sequential = sum(_time_steps(single, [m], config, batches, args.repeats) for m in members)
  together = _time_steps(stacked, members, config, batches, args.repeats)
  print(
    f"input [{args.batch}, {args.n_bins}, {args.n_frames}, 1], width {args.width}, "
    f"{args.steps} steps per model"
  )
  print(f"{args.members} sequential runs: {sequential:.2f} s")
  print(f"{args.members}-member vmapped sweep: {together:.2f} s")
  print(f"speed-up (sequential / vmapped): {sequential / together:.2f}x")
  for name, programs, group in (("1 member", single, members[:1]), ("sweep", stacked, members)):
    print(f"{name}: {_step_memory_mib(programs, group, config, batches[0]):.0f} MiB per train step")


def _step_memory_mib(programs, members, config, batch) -> float:
  """XLA's own account of a compiled train step's memory: arguments + outputs + temporaries."""
  state = jax.eval_shape(programs.init, np.array([m.seed for m in members], np.uint32), 0)
  hparams = experiment.stacked_hparams(config, members, None, 0, 1, tuple(config.data.classes))
  memory = programs.train_step.lower(state, batch, hparams).compile().memory_analysis()
  used = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return used / 2**20


if __name__ == "__main__":
  cpu.tune_process()  # Before JAX starts, as `python -m ser_jax.main` does.
  main()
