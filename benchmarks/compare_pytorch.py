"""ser_jax's train and eval steps against the same ResNet-18 in PyTorch, same process.

For each input kind and batch size, alternates the frameworks repetition by repetition
(so background load hits both alike) and prints samples/s (median [min-max]) and the
ratio JAX/PyTorch of the medians. PyTorch: eager train step (channels-last, AdamW,
focal loss, same augmentation) and eval eager and, unless --no-compile, torch.compile.
JAX: ser_jax's jitted steps as experiment.Programs builds them; --variants adds model
variants from variants.py ('base' is ser_jax's own model).

  python benchmarks/compare_pytorch.py                      # mfcc+logmel, batch 32+64
  python benchmarks/compare_pytorch.py --kinds mfcc --batches 32 --variants base,fast
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch_resnet


def _rate(fn, n: int, batch: int) -> float:
  start = time.perf_counter()
  fn(n)
  return n * batch / (time.perf_counter() - start)


def run(kind: str, batch: int, args) -> list[tuple]:
  config = common.make_config(kind, batch)
  data = common.synthetic_batch(kind, batch)
  runners = {}
  for name in args.variants.split(","):
    model = None
    if name != "base":
      import variants

      model = variants.create_model(name, config.model, common.N_CLASSES)
    runners[name] = common.JaxRunner(common.build_steps(config, model=model), data)
  trainer = torch_resnet.TorchTrainer()
  compile_s = None
  if not args.no_compile:
    start = time.perf_counter()
    try:
      trainer.compile_eval()
      trainer.eval_step(data, compiled=True)
      compile_s = time.perf_counter() - start
    except Exception as error:  # Inductor needs a working C++ toolchain.
      print(f"torch.compile skipped: {type(error).__name__}: {error}")
      trainer.compiled_eval = None

  def torch_train(n):
    for _ in range(n):
      trainer.train_step(data)

  def torch_eval(n, compiled=False):
    for _ in range(n):
      trainer.eval_step(data, compiled)

  jobs = {}
  for name, runner in runners.items():
    jobs[("train", f"jax {name}")] = runner.train_many
    jobs[("eval", f"jax {name}")] = runner.eval_many
  jobs[("train", "torch eager")] = torch_train
  jobs[("eval", "torch eager")] = torch_eval
  if trainer.compiled_eval is not None:
    jobs[("eval", "torch compile")] = lambda n: torch_eval(n, True)
  for fn in jobs.values():
    fn(args.warmup)
  rates = {key: common.Samples() for key in jobs}
  for _ in range(args.reps):
    for key, fn in jobs.items():
      n = args.steps if key[0] == "train" else args.eval_steps
      rates[key].measure(lambda fn=fn, n=n: _rate(fn, n, batch))
  rows = []
  for mode in ("train", "eval"):
    eager = rates[(mode, "torch eager")].median
    compiled = rates.get((mode, "torch compile"))
    for key, samples in rates.items():
      if key[0] == mode:
        median = samples.median
        vs_compile = median / compiled.median if compiled else float("nan")
        rows.append((kind, batch, mode, key[1], samples, median / eager, vs_compile))
  if compile_s is not None:
    print(f"[{kind} {batch}] torch.compile of the eval model took {compile_s:.0f} s")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kinds", default="mfcc,logmel")
  parser.add_argument("--batches", default="32,64")
  parser.add_argument("--variants", default="base")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="train steps per repetition")
  parser.add_argument("--eval-steps", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-compile", action="store_true")
  args = parser.parse_args()
  print(common.machine_line())
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
  rows = []
  for kind in args.kinds.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      rows += run(kind, batch, args)
  print(
    f"\n{'kind':6s} {'batch':>5s} {'step':5s} {'framework':16s} "
    f"{'samples/s median [min-max] n=clean/all':>38s} {'/torch eager':>12s} {'/torch compile':>14s}"
  )
  for kind, batch, mode, name, samples, ratio, vs_compile in rows:
    print(
      f"{kind:6s} {batch:5d} {mode:5s} {name:16s} {samples!s:>38s} {ratio:12.2f} {vs_compile:14.2f}"
    )


if __name__ == "__main__":
  main()
