"""Where a train step's time goes: XLA profiler trace, per-op times grouped by role.

Runs ser_jax's real train step (or a variant model from variants.py) under
jax.profiler, maps each executed thunk to its HLO instruction and groups them:
forward / input-grad / weight-grad convolutions (and which backend ran them),
max-pool, layout transposes, BatchNorm/ReLU element-wise work, optimiser. With
--overlap, it compares each custom call (oneDNN convolution) that XLA ran beside other
ops with the calls of its shape that ran alone.

  python benchmarks/profile_step.py --kind mfcc --batch 32 [--variant im2col] [--overlap]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import common
import jax
import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+|\(.*?\)) ([\w\-]+)\(")
_KERNELS = {(1, 1), (3, 3), (7, 7)}


def parse_hlo(text: str):
  """{computation: [lines]} and {entry instruction name: line}."""
  comps, cur = {}, None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      cur = head.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry_name = cur
    elif cur is not None:
      comps[cur].append(line)
  entry = {}
  for line in comps[entry_name]:
    m = _INSTR.match(line)
    if m:
      entry[m.group(1)] = line
  return comps, entry


def _dims(shape: str) -> tuple[int, ...]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _conv_role(conv_line: str) -> str:
  """'fwd', 'dgrad' or 'wgrad' of a b01f_01io->b01f convolution line.

  A weight gradient's output is [C_in, kh, kw, C_out] and its window spans the activation.
  """
  out = _dims(conv_line.split("=", 1)[1])
  window = re.search(r"size=(\d+)x(\d+)", conv_line)
  win = (int(window.group(1)), int(window.group(2))) if window else (1, 1)
  name = re.search(r'op_name="([^"]*)"', conv_line)
  op_name = name.group(1) if name else ""
  if len(out) == 4 and (out[1], out[2]) in _KERNELS and win != (out[1], out[2]):
    if "transpose(" in op_name or not op_name:
      return "wgrad"
  return "dgrad" if "transpose(" in op_name else "fwd"


def categorise(name: str, comps, entry) -> tuple[str, str]:
  """(category, detail) of one entry instruction."""
  line = entry.get(name, "")
  called = re.search(r"calls=%([\w.\-]+)", line)
  body = "\n".join(comps.get(called.group(1), [])) if called else ""
  text = line + "\n" + body
  backend = "ynn" if "__ynn_fusion" in line else ("onednn" if "onednn" in line.lower() else "eigen")
  op = re.search(r'op_name="([^"]*)"', line)
  op_name = op.group(1) if op else ""
  if "transpose" in name:
    return "transpose/layout", line.strip()[:160]
  target = re.search(r'custom_call_target="([^"]*)"', line)
  if target:
    return f"custom call {target.group(1)}", line.strip()[:160]
  if " convolution(" in text:
    conv_line = next(x for x in text.splitlines() if " convolution(" in x)
    role = _conv_role(conv_line)
    return f"conv {role} ({backend})", conv_line.strip()[:160]
  if " dot(" in text:
    return f"dot ({backend})", line.strip()[:160]
  if "reduce-window" in text or "select-and-scatter" in text:
    tuple_out = re.match(r"^\s*(?:ROOT )?%[\w.\-]+ = \(", line)
    bwd = tuple_out or "transpose(" in op_name or "select-and-scatter" in text
    return ("maxpool bwd" if bwd else "maxpool fwd"), line.strip()[:160]
  if "iota" in name:
    return "maxpool bwd", line.strip()[:160]
  if re.search(r" transpose\(", body):
    return "transpose/layout", line.strip()[:160]
  if name.startswith("copy") or " copy(" in body:
    return "copy", line.strip()[:160]
  if "jvp(" in op_name and "transpose(" in op_name:
    return "bwd elementwise (BN/ReLU/add)", line.strip()[:160]
  if "jvp(" in op_name:
    return "fwd elementwise (BN/ReLU/add)", line.strip()[:160]
  if op_name:
    return "optimizer/loss/augment", line.strip()[:160]
  return "other", line.strip()[:160]


def trace_events(run_once, n_steps: int) -> tuple[list[dict], float]:
  """The profiler's complete ('X') events over n_steps steps, and their wall seconds."""
  import time

  logdir = tempfile.mkdtemp(prefix="ser_jax_trace_")
  jax.profiler.start_trace(logdir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(n_steps):
    run_once()
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(logdir, "plugins/profile/*/perfetto_trace.json.gz")))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"], wall


def trace_op_times(run_once, n_steps: int) -> tuple[dict[str, float], float]:
  """{thunk name: total seconds} over n_steps profiled steps, and their wall seconds."""
  events, wall = trace_events(run_once, n_steps)
  totals = collections.Counter()
  for e in events:
    totals[e["name"]] += e.get("dur", 0) / 1e6
  return totals, wall


def custom_call_overlap(runner_once, compiled_text: str, n_steps: int) -> None:
  """How much longer custom calls (oneDNN) take when XLA runs another op beside them.

  Each custom call is 'clean' when other ops cover under 5 % of its duration; the excess
  of an overlapped call is its time over the clean median of calls of the same shape.
  """
  _, entry = parse_hlo(compiled_text)
  events, _ = trace_events(runner_once, n_steps)
  ops = [e for e in events if e["name"] in entry]
  calls = [e for e in ops if "custom-call(" in entry[e["name"]]]
  others = [e for e in ops if "custom-call(" not in entry[e["name"]]]
  groups = collections.defaultdict(lambda: ([], []))
  beside = collections.Counter()
  for call in calls:
    start, end = call["ts"], call["ts"] + call["dur"]
    covered = 0.0
    for other in others:
      shared = min(end, other["ts"] + other["dur"]) - max(start, other["ts"])
      if shared > 0:
        covered += shared
        beside[other["name"].rsplit(".", 1)[0]] += shared / 1e3 / n_steps
    line = entry[call["name"]]
    role = re.search(r'custom_call_target="([^"]*)"', line).group(1).split("onednn_")[-1]
    shape = line.split("=", 1)[1].split("custom-call(")[0].strip().split("{")[0]
    groups[(shape, role)][covered >= 0.05 * call["dur"]].append(call["dur"] / 1e3)
  excess = 0.0
  print(
    f"{'custom call':34s} {'clean n':>7s} {'median ms':>9s} {'overlapped n':>12s} {'median ms':>9s}"
  )
  for (shape, role), (clean, overlapped) in sorted(groups.items()):
    clean_ms = np.median(clean) if clean else float("nan")
    if clean:
      excess += sum(d - clean_ms for d in overlapped)
    over_ms = np.median(overlapped) if overlapped else float("nan")
    print(
      f"{shape + ' ' + role:34s} {len(clean):7d} {clean_ms:9.2f} {len(overlapped):12d} {over_ms:9.2f}"
    )
  print(
    f"excess time of overlapped calls: {excess / n_steps:.1f} ms/step; ops beside them (ms/step):"
  )
  for name, ms in beside.most_common(5):
    print(f"  {name:40s} {ms:6.2f}")


def profile(runner_once, compiled_text: str, n_steps: int, top: int = 15) -> None:
  comps, entry = parse_hlo(compiled_text)
  totals, wall = trace_op_times(runner_once, n_steps)
  by_cat = collections.Counter()
  rows = []
  for name, seconds in totals.items():
    if name in entry:
      cat, detail = categorise(name, comps, entry)
    else:  # Runtime events without an entry instruction (e.g. library calls, executables).
      cat, detail = f"unmapped: {name[:30]}", name
    by_cat[cat] += seconds / n_steps
    rows.append((seconds / n_steps, name, cat, detail))
  op_sum = sum(by_cat.values())
  print(f"wall {1e3 * wall / n_steps:.1f} ms/step; sum of op times {1e3 * op_sum:.1f} ms/step")
  print(f"{'category':38s} {'ms/step':>9s} {'share':>6s}")
  for cat, seconds in by_cat.most_common():
    print(f"{cat:38s} {1e3 * seconds:9.1f} {100 * seconds / op_sum:5.1f}%")
  print(f"\ntop {top} ops:")
  for seconds, name, cat, detail in sorted(rows, reverse=True)[:top]:
    print(f"{1e3 * seconds:8.1f} ms  {name:32s} {cat:28s} {detail[:110]}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=sorted(common.N_BINS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variant", default="", help="a model from variants.py (default: ser_jax)")
  parser.add_argument("--eval", action="store_true", help="profile the eval step instead")
  parser.add_argument("--top", type=int, default=15, help="list this many slowest ops")
  parser.add_argument("--n-frames", type=int, default=common.N_FRAMES, help="input width")
  parser.add_argument(
    "--overlap", action="store_true", help="custom calls with and without XLA ops beside them"
  )
  args = parser.parse_args()
  common.N_FRAMES = args.n_frames
  print(common.machine_line())
  config = common.make_config(args.kind, args.batch)
  model = None
  if args.variant:
    import variants

    model = variants.create_model(args.variant, config.model, common.N_CLASSES)
  steps = common.build_steps(config, model=model)
  runner = common.JaxRunner(steps, common.synthetic_batch(args.kind, args.batch))
  batch = steps.topology.global_batch(runner.batch_np)
  if args.eval:
    compiled = steps.eval_step.lower(*runner.eval_arguments()).compile()
    once = runner.eval_once
  else:
    compiled = steps.train_step.lower(steps.state, batch, steps.hparams).compile()
    once = runner.train_once
  for _ in range(2):
    once()
  np.set_printoptions(precision=3)
  if args.overlap:
    custom_call_overlap(once, compiled.as_text(), args.steps)
  else:
    profile(once, compiled.as_text(), args.steps, args.top)


if __name__ == "__main__":
  main()
