"""oneDNN's own timing of every primitive in one ser_jax step and one PyTorch step.

Both frameworks run their convolutions in oneDNN (ser_jax through its custom calls,
PyTorch through its bundled copy), so per-primitive times show whether a gap between
their steps lies inside oneDNN (kernel versions, weight reorders) or outside it. Each
framework runs in a process of its own with oneDNN's verbose mode on for --steps steps
after warm-up; times are ms per step, summed per primitive kind and per problem.

  python benchmarks/onednn_primitives.py --kind mfcc --batch 32 [--eval] [--by-problem]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys

import common

from ser_jax import malloc

_START, _END = "== timed steps start ==", "== timed steps end =="

_CHILD = f"""
import sys
import common
kind, batch, steps, framework, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = common.synthetic_batch(kind, batch)
if framework == "jax":
    runner = common.JaxRunner(common.build_steps(common.make_config(kind, batch)), data)
    run = runner.train_once if step == "train" else runner.eval_once
else:
    import torch, torch_resnet
    trainer = torch_resnet.TorchTrainer()
    run = (lambda: trainer.train_step(data)) if step == "train" else (lambda: trainer.eval_step(data))
for _ in range(3):
    run()
print({_START!r}, flush=True)
import time
start = time.perf_counter()
if framework == "jax":
    for _ in range(steps):
        run()
else:
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        for _ in range(steps):
            run()
print({_END!r}, flush=True)
print("wall_ms", 1e3 * (time.perf_counter() - start) / steps)
"""


def parse(text: str, steps: int) -> dict[tuple[str, str, str], tuple[float, str]]:
  """{(primitive, propagation kind, problem): (ms per step, implementation)} of the timed steps.

  Reads both verbose formats: oneDNN 3.2's `onednn_verbose,exec,cpu,...` and newer
  versions' `onednn_verbose,v1,primitive,exec,cpu,...`; the last two fields are the
  problem and the time in ms.
  """
  timed = text.split(_START, 1)[1].split(_END, 1)[0]
  totals = collections.defaultdict(float)
  impls = {}
  for line in timed.splitlines():
    fields = line.split(",")
    if not line.startswith("onednn_verbose") or "exec" not in fields[:4]:
      continue
    at = fields.index("exec")
    primitive, impl, prop = fields[at + 2], fields[at + 3], fields[at + 4]
    key = (primitive, prop, fields[-2])
    totals[key] += float(fields[-1]) / steps
    impls[key] = impl
  return {key: (ms, impls[key]) for key, ms in totals.items()}


def run_framework(framework: str, args) -> tuple[dict, float]:
  """parse()'s table for one framework's timed steps, and their wall ms per step."""
  env = dict(os.environ, ONEDNN_VERBOSE="1" if framework == "jax" else "0")
  if framework == "torch":
    env[malloc.OPT_OUT] = "0"  # PyTorch with the malloc its users have.
  step = "eval" if args.eval else "train"
  done = subprocess.run(
    [sys.executable, "-c", _CHILD, args.kind, str(args.batch), str(args.steps), framework, step],
    env=env,
    cwd=os.path.dirname(os.path.abspath(__file__)),
    capture_output=True,
    text=True,
  )
  if done.returncode != 0:
    raise SystemExit(f"{framework} run failed:\n{done.stderr[-3000:]}")
  wall_ms = float(done.stdout.split("wall_ms", 1)[1].split()[0])
  return parse(done.stdout, args.steps), wall_ms


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=sorted(common.N_BINS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--eval", action="store_true", help="the eval step instead of train")
  parser.add_argument("--by-problem", action="store_true", help="one row per problem shape")
  args = parser.parse_args()
  print(common.machine_line())
  runs = {name: run_framework(name, args) for name in ("jax", "torch")}
  results = {name: result for name, (result, _) in runs.items()}
  kinds = collections.defaultdict(lambda: {"jax": 0.0, "torch": 0.0})
  for name, result in results.items():
    for (primitive, prop, _), (ms, _) in result.items():
      kinds[(primitive, prop)][name] += ms
  print(f"\n{'primitive':14s} {'propagation':18s} {'ser_jax ms':>10s} {'torch ms':>9s}")
  for (primitive, prop), ms in sorted(kinds.items()):
    print(f"{primitive:14s} {prop:18s} {ms['jax']:10.2f} {ms['torch']:9.2f}")
  total = {name: sum(ms for ms, _ in result.values()) for name, result in results.items()}
  print(f"{'all of oneDNN':33s} {total['jax']:10.2f} {total['torch']:9.2f}")
  wall = {name: wall_ms for name, (_, wall_ms) in runs.items()}
  print(f"{'step (wall, verbose on)':33s} {wall['jax']:10.2f} {wall['torch']:9.2f}")
  outside = {name: wall[name] - total[name] for name in wall}
  print(f"{'outside oneDNN':33s} {outside['jax']:10.2f} {outside['torch']:9.2f}")
  if args.by_problem:
    keys = sorted(set(results["jax"]) | set(results["torch"]))
    print(f"\n{'primitive':12s} {'propagation':17s} {'problem':58s} {'ser_jax':>8s} {'torch':>8s}")
    for key in keys:
      jax_ms, jax_impl = results["jax"].get(key, (0.0, ""))
      torch_ms, torch_impl = results["torch"].get(key, (0.0, ""))
      print(
        f"{key[0][:12]:12s} {key[1][:17]:17s} {key[2][:58]:58s} {jax_ms:8.2f} {torch_ms:8.2f}"
        f"  {jax_impl} / {torch_impl}"
      )


if __name__ == "__main__":
  main()
