"""Checks the oneDNN path against XLA's at one model shape; run by test_onednn_isa.py in a
subprocess with ONEDNN_MAX_CPU_ISA set, so a crash fails one test, not the test run.

`python tests/onednn_isa_check.py SHAPE...` prints one JSON line: the problems found
at each shape.
  - every oneDNN call of a train step and a fused evaluation, replayed on random data
    against XLA (ser_jax.cpu.selftest.check_call);
  - at the shapes of WHOLE_MODEL, one train step's loss, gradients and BatchNorm statistics,
    and the fused evaluation's probabilities, of the whole model under the 'onednn'
    lowering against 'xla': how the calls are put together, which the configs' full-size
    shapes would check again at several times the cost.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import randomised_batch_norms

from ser_jax import cpu, models
from ser_jax.cpu import selftest

# name: (batch, n_bins, n_frames, width). The configs' shapes, and a width-4 model whose
# stride-2 1x1 projections have 4 input channels (fewer than any AVX2 block).
SHAPES = {
  "mfcc": (32, 40, 259, 64),
  "logmel": (32, 128, 259, 64),
  "demo": (32, 40, 130, 16),
  "narrow": (8, 32, 48, 4),
}
WHOLE_MODEL = ("demo", "narrow")
# Of each array's norm. float32 sums in another order change a train step's gradients by
# up to about 1e-3 here (as much as a 1e-6 change of the input does); the failures this
# catches are of order 1.
RELATIVE_TOLERANCE = 1e-2


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(name: str, got, want, problems: list) -> None:
  for (path, a), b in zip(jax.tree.flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
    error = _relative_error(a, b)
    if not error <= RELATIVE_TOLERANCE:
      problems.append(f"{name}{jax.tree_util.keystr(path)}: relative error {error:.3g}")


def check(shape_name: str) -> list[str]:
  batch, n_bins, n_frames, width = SHAPES[shape_name]
  input_shape = (batch, n_bins, n_frames, 1)

  def make(ops):
    return models.ResNet18(num_classes=4, width=width, **ops)

  problems = [
    failure
    for call in selftest.record_calls(make, [input_shape, input_shape])
    if (failure := selftest.check_call(call))
  ]
  if shape_name not in WHOLE_MODEL:
    return problems
  x = jax.random.normal(jax.random.key(1), input_shape)
  labels = jnp.arange(batch) % 4
  reference, onednn = make(cpu.XLA_OPS), make(cpu.ONEDNN_OPS)
  variables = randomised_batch_norms(
    reference.init(jax.random.key(0), x, train=False), jax.random.key(2)
  )

  def loss(model, variables):
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels]), updates

  results = {}
  for name, model in (("xla", reference), ("onednn", onednn)):
    step = jax.jit(jax.value_and_grad(lambda v, m=model: loss(m, v), has_aux=True))
    (value, updates), grads = step(variables)
    trained = {"params": variables["params"], **updates}
    evaluate = cpu.backend(name).evaluate  # Each backend's own evaluation.
    probabilities = jax.jit(lambda v, m=model, f=evaluate: f(m.apply, v, x[None, ..., 0])[0])(
      trained
    )
    results[name] = (value, grads["params"], updates, probabilities)
  for label, got, want in zip(
    ("loss", "gradient", "batch_stats", "probabilities"),
    results["onednn"],
    results["xla"],
    strict=True,
  ):
    _compare(label, got, want, problems)
  return problems


if __name__ == "__main__":
  print(json.dumps({name: check(name) for name in sys.argv[1:]}))
