"""ser_jax's train and eval steps against the same ResNet-18 in PyTorch, same process.

For each input kind and batch size, alternates the frameworks repetition by repetition
(so background load hits both alike) and prints samples/s (median [min-max]), the ratio
JAX/PyTorch of the medians, and each step's achieved GFLOP/s (XLA's count of the
model's FLOPs) against the machine's limit: the best float32 matmul at hand (jnp.dot,
oneDNN's sgemm), timed between repetitions. PyTorch: eager train step (channels-last,
AdamW, focal loss, same augmentation) and eval eager and, unless --no-compile,
torch.compile.
JAX: ser_jax's jitted steps as experiment.Programs builds them, with each lowering of
--lowering ('auto', as a run chooses it, 'xla', 'cpu', 'onednn'; comma-separated).
With --processes separate, each framework runs in a spawned process of its own (two
OpenMP runtimes in one process slow each other down), still alternating repetition by
repetition.

  python benchmarks/compare_pytorch.py                      # mfcc+logmel, batch 32+64
  python benchmarks/compare_pytorch.py --kinds mfcc --batches 32 --lowering onednn,cpu
  python benchmarks/compare_pytorch.py --processes separate --no-compile
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import common

from ser_jax import cpu


def _rate(fn, n: int, batch: int) -> float:
  start = time.perf_counter()
  fn(n)
  return n * batch / (time.perf_counter() - start)


def _jax_jobs(kind: str, batch: int, args) -> dict:
  """{(step, name): fn(n)} running ser_jax's jitted steps n times."""
  config = common.make_config(kind, batch)
  data = common.synthetic_batch(kind, batch)
  jobs = {}
  for name in dict.fromkeys(args.lowering):
    backend = common.select_backend(config, name)
    print(f"[{kind} {batch}] jax {common.lowering_line(name, backend)}")
    runner = common.JaxRunner(common.build_steps(config, backend), data)
    label = name if backend.lowering == name else f"{name}->{backend.lowering}"
    jobs[("train", f"jax {label}")] = runner.train_many
    jobs[("eval", f"jax {label}")] = runner.eval_many
  return jobs


def _torch_jobs(kind: str, batch: int, args) -> dict:
  """{(step, name): fn(n)} running the PyTorch model's eager (and compiled eval) steps."""
  import torch_resnet

  data = common.synthetic_batch(kind, batch)
  trainer = torch_resnet.TorchTrainer()
  if not args.no_compile:
    start = time.perf_counter()
    try:
      trainer.compile_eval()
      trainer.eval_step(data, compiled=True)
      print(
        f"[{kind} {batch}] torch.compile of the eval model took {time.perf_counter() - start:.0f} s"
      )
    except Exception as error:  # Inductor needs a working C++ toolchain.
      print(f"torch.compile skipped: {type(error).__name__}: {error}")
      trainer.compiled_eval = None

  def torch_train(n):
    for _ in range(n):
      trainer.train_step(data)

  def torch_eval(n, compiled=False):
    for _ in range(n):
      trainer.eval_step(data, compiled)

  jobs = {("train", "torch eager"): torch_train, ("eval", "torch eager"): torch_eval}
  if trainer.compiled_eval is not None:
    jobs[("eval", "torch compile")] = lambda n: torch_eval(n, True)
  return jobs


_JOBS = {"jax": _jax_jobs, "torch": _torch_jobs}


class _InProcess:
  """A framework's jobs in this process."""

  def __init__(self, framework: str, kind: str, batch: int, args):
    self.batch = batch
    self.jobs = _JOBS[framework](kind, batch, args)
    for fn in self.jobs.values():
      fn(args.warmup)
    self.keys = list(self.jobs)

  def rate(self, key, n: int) -> float:
    return _rate(self.jobs[key], n, self.batch)

  def close(self) -> None:
    self.jobs.clear()


def _serve(conn, framework: str, kind: str, batch: int, args) -> None:
  # A spawned process starts afresh: ser_jax's process settings (XLA:CPU flags, malloc) are
  # applied again, in the JAX process only. PyTorch runs with glibc's default malloc, as
  # its users have it.
  if framework == "jax":
    cpu.tune_process()
  jobs = _InProcess(framework, kind, batch, args)
  conn.send(jobs.keys)
  while (request := conn.recv()) is not None:
    conn.send(jobs.rate(*request))


class _Subprocess:
  """A framework's jobs in a spawned process of its own (its own OpenMP runtime)."""

  def __init__(self, framework: str, kind: str, batch: int, args):
    context = multiprocessing.get_context("spawn")
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_serve, args=(child, framework, kind, batch, args))
    self.process.start()
    self.keys = self.conn.recv()

  def rate(self, key, n: int) -> float:
    self.conn.send((key, n))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send(None)
    self.process.join()


def run(kind: str, batch: int, args) -> list[tuple]:
  host = _Subprocess if args.processes == "separate" else _InProcess
  frameworks = [host(name, kind, batch, args) for name in ("jax", "torch")]
  rates = {key: common.Samples() for fw in frameworks for key in fw.keys}
  peaks = common.Peaks()
  for _ in range(args.reps):
    for fw in frameworks:
      for key in fw.keys:
        n = args.steps if key[0] == "train" else args.eval_steps
        rates[key].measure(lambda fw=fw, key=key, n=n: fw.rate(key, n))
    peaks.measure()
  for fw in frameworks:
    fw.close()
  peak = peaks.best
  print(f"[{kind} {batch}] the machine's limit, {peaks}")
  config, data = common.make_config(kind, batch), common.synthetic_batch(kind, batch)
  train_flops, eval_flops = common.model_flops(config, data)
  flops = {"train": train_flops, "eval": eval_flops}
  rows = []
  for mode in ("train", "eval"):
    eager = rates[(mode, "torch eager")].median
    compiled = rates.get((mode, "torch compile"))
    for key, samples in rates.items():
      if key[0] == mode:
        median = samples.median
        vs_compile = median / compiled.median if compiled else float("nan")
        gflops = flops[mode] / 1e9 * median / batch
        ratios = (median / eager, vs_compile)
        rows.append((kind, batch, mode, key[1], samples, gflops, gflops / peak, *ratios))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kinds", default="mfcc,logmel")
  parser.add_argument("--batches", default="32,64")
  parser.add_argument(
    "--lowering",
    default=["auto"],
    type=common.lowerings,
    help=f"ser_jax's lowerings, comma-separated, each one of: {', '.join(cpu.LOWERINGS)}",
  )
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="train steps per repetition")
  parser.add_argument("--eval-steps", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-compile", action="store_true")
  parser.add_argument(
    "--processes",
    default="same",
    choices=("same", "separate"),
    help="'separate': each framework in a spawned process of its own, still alternated",
  )
  args = parser.parse_args()
  import torch

  print(common.machine_line())
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, processes {args.processes}")
  rows = []
  for kind in args.kinds.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      rows += run(kind, batch, args)
  print(
    f"\n{'kind':6s} {'batch':>5s} {'step':5s} {'framework':20s} "
    f"{'samples/s median [min-max] n=clean/all':>38s} {'GFLOP/s':>7s} {'of peak':>7s} "
    f"{'/torch eager':>12s} {'/torch compile':>14s}"
  )
  for kind, batch, mode, name, samples, gflops, share, ratio, vs_compile in rows:
    print(
      f"{kind:6s} {batch:5d} {mode:5s} {name:20s} {samples!s:>38s} {gflops:7.1f} "
      f"{100 * share:6.0f}% {ratio:12.2f} {vs_compile:14.2f}"
    )


if __name__ == "__main__":
  cpu.tune_process()  # Before JAX starts, as `python -m ser_jax.main` does.
  main()
