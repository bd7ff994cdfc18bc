"""The oneDNN library proves itself on this machine before a run uses it.

Every custom call a model would make (forward, both gradients, fused inference, at the
run's shapes) is recorded while the model is traced, then replayed on random data in a
child process and compared with XLA's convolutions. A crash, a hang or a wrong value
there costs the run nothing but the fast path. Verdicts are cached under
$SER_JAX_CACHE/onednn_selftest, keyed by what decides the calls (the model, its input
shapes and ser_jax's source), the library build, the CPU and the oneDNN settings: a run
whose verdict is cached traces nothing for it.

`python -m ser_jax.cpu.selftest CALLS.json VERDICT.json` is the child.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ser_jax import io_utils
from ser_jax.cache import default_cache_dir
from ser_jax.cpu import onednn

TIMEOUT_SECONDS = 300
# float32 sums in another order: errors are a few ulps of the output's scale; the bugs this
# catches are off by the output's own size.
TOLERANCE = 1e-4
# The environment that changes which oneDNN implementations run.
_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_CPU_ISA_HINTS", "OMP_NUM_THREADS")
_NHWC = ("NHWC", "HWIO", "NHWC")
_DEMO_SHAPES = ((8, 40, 130, 1), (8, 40, 130, 1))
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
_verdicts: dict[str, str] = {}  # This process's verdicts, by cache key.


def default_model(ops):
  from ser_jax import models

  return models.ResNet18(num_classes=4, width=16, **ops)


def record_calls(make_model=None, input_shapes=()) -> list:
  """The oneDNN calls of one train step's gradients and one fused evaluation of
  `make_model(ops)` on inputs of `input_shapes` ([train, eval]; default: a demo batch)."""
  from ser_jax import cpu

  return _calls_of((make_model or default_model)(cpu.ONEDNN_OPS), input_shapes or _DEMO_SHAPES)


def _calls_of(model, input_shapes) -> list:
  from ser_jax.cpu import fused

  train_shape, eval_shape = input_shapes
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(train_shape), train=False)
  )

  def loss(variables, x):
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits.sum()

  x_eval = jax.ShapeDtypeStruct(eval_shape, jnp.float32)
  with onednn.recording_calls() as calls:
    jax.eval_shape(jax.grad(loss), variables, jax.ShapeDtypeStruct(train_shape, jnp.float32))
    packed = jax.eval_shape(functools.partial(fused.packed_kernels, model.apply), variables, x_eval)
    jax.eval_shape(
      lambda v, p, x: model.apply({**v, **p}, x, train=False), variables, packed, x_eval
    )
  unique = {json.dumps(call, sort_keys=True): call for call in calls if "pack" not in call[0]}
  return [unique[key] for key in sorted(unique)]


def failure(make_model=None, input_shapes=()) -> str:
  """'' when the library computes every call of the model right on this machine, else why
  not (one line). Records the model's calls and runs the child only where no verdict is
  cached for its key."""
  from ser_jax import cpu

  model = (make_model or default_model)(cpu.ONEDNN_OPS)
  input_shapes = tuple(tuple(shape) for shape in input_shapes or _DEMO_SHAPES)
  key = hashlib.sha256(
    "\0".join(
      [
        re.sub(r" at 0x[0-9a-f]+", "", repr(model)),  # Its fields, without memory addresses.
        repr(input_shapes),
        _source_digest(),
        onednn.library_key(),
        cpu_description(),
        *_environment(),
      ]
    ).encode()
  ).hexdigest()[:16]
  if key not in _verdicts:
    _verdicts[key] = _verdict(key, lambda: _calls_of(model, input_shapes))
  return _verdicts[key]


@functools.cache
def _source_digest() -> str:
  """A digest of ser_jax's Python source, which decides the calls a model makes."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE.rglob("*.py")):
    digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def _verdict(key: str, record) -> str:
  """The cached verdict of `key`, or the child's on the calls `record()` returns."""
  path = default_cache_dir() / "onednn_selftest" / f"{key}.json"
  if path.exists():
    return json.loads(path.read_text())["failure"]
  start = time.time()
  failure = _run_child(json.dumps(record(), sort_keys=True))
  verdict = {"failure": failure, "seconds": round(time.time() - start, 2)}
  verdict.update(cpu=cpu_description(), environment=_environment(), onednn=onednn.version())
  path.parent.mkdir(parents=True, exist_ok=True)
  io_utils.atomic_write_json(path, verdict)
  logging.info(
    "oneDNN self-test %s in %.1f s (%s)",
    "failed" if failure else "passed",
    verdict["seconds"],
    path,
  )
  return failure


def _environment() -> list[str]:
  return [f"{name}={os.environ.get(name, '')}" for name in _ENVIRONMENT]


def cpu_description() -> str:
  """The CPU's model name and instruction-set flags (Linux), else what platform knows."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"
  fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  return f"{fields.get('model name', platform.machine())} | {fields.get('flags', '')}"


def cpu_model() -> str:
  """The CPU's model name, for results files."""
  return cpu_description().split(" | ")[0]


def child_command(calls_path: str, verdict_path: str) -> list[str]:
  return [sys.executable, "-m", "ser_jax.cpu.selftest", calls_path, verdict_path]


def _run_child(calls_json: str) -> str:
  with tempfile.TemporaryDirectory() as tmp:
    calls_path, verdict_path = os.path.join(tmp, "calls.json"), os.path.join(tmp, "verdict.json")
    pathlib.Path(calls_path).write_text(calls_json)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
      done = subprocess.run(
        child_command(calls_path, verdict_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
      )
    except subprocess.TimeoutExpired:
      return f"the self-test did not finish in {TIMEOUT_SECONDS} s"
    if done.returncode < 0:
      return f"the self-test crashed (signal {-done.returncode})"
    if done.returncode != 0 or not os.path.exists(verdict_path):
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      return f"the self-test failed (exit {done.returncode}: {last})"
    return json.loads(pathlib.Path(verdict_path).read_text())["failure"]


def _reference(role: str, operands, attributes):
  strides = tuple(attributes["strides"])
  pads = attributes["padding"]
  padding = ((pads[0], pads[1]), (pads[2], pads[3]))

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_NHWC, precision=jax.lax.Precision.HIGHEST
    )

  if role == "forward":
    return conv(*operands)
  if role == "input_grad":
    dy, w = operands
    x = jnp.zeros(attributes["out_shape"], jnp.float32)
    return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
  if role == "kernel_grad":
    x, dy = operands
    w = jnp.zeros(attributes["out_shape"], jnp.float32)
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]
  x, w, scale, shift, *residual = operands
  y = conv(x, w) * scale + shift
  if residual:
    y = y + residual[0]
  return jnp.maximum(y, 0.0) if role != "affine" else y


def check_call(call, seed: int = 0) -> str:
  """'' when oneDNN's result for one recorded call matches XLA's, else the mismatch."""
  role, operand_shapes, out_shape, attributes = call
  strides, padding = tuple(attributes["strides"]), attributes["padding"]
  padding = ((padding[0], padding[1]), (padding[2], padding[3]))
  rng = np.random.default_rng(seed)
  operands = [rng.standard_normal(shape, dtype=np.float32) for shape in operand_shapes]
  if role.startswith("affine"):
    kernel_shape = tuple(attributes["kernel_shape"])
    operands[1] = rng.standard_normal(kernel_shape, dtype=np.float32)
    relu, residual = role != "affine", role == "affine_sum_relu"
    packed = onednn.pack_kernel(
      jnp.asarray(operands[1]), operand_shapes[0], strides, padding, relu, residual
    )
    result = onednn.conv_affine(
      operands[0],
      packed,
      operands[2],
      operands[3],
      strides,
      padding,
      relu,
      operands[4] if residual else None,
      kernel_shape,
    )
  else:
    result = onednn._call(
      role, tuple(out_shape), [jnp.asarray(o) for o in operands], strides, padding
    )
  expected = _reference(
    role, [jnp.asarray(o) for o in operands], {**attributes, "out_shape": out_shape}
  )
  scale = float(jnp.max(jnp.abs(expected))) or 1.0
  error = float(jnp.max(jnp.abs(jnp.asarray(result) - expected))) / scale
  if not np.isfinite(error) or error > TOLERANCE:
    return (
      f"oneDNN's {role} for {operand_shapes[0]} x {operand_shapes[1]} (strides {strides}) is off "
      f"by {error:.2g} of the output's scale"
    )
  return ""


def main(argv) -> int:
  calls_path, verdict_path = argv
  calls = json.loads(pathlib.Path(calls_path).read_text())
  onednn.require()
  failure = ""
  for call in calls:
    failure = check_call(call)
    if failure:
      break
  pathlib.Path(verdict_path).write_text(json.dumps({"failure": failure}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
