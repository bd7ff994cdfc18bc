"""The CPU backend: everything that exists only to make ser_jax fast on CPUs.

The experiment and predict ask `select_backend(config.model.lowering, ...)` once for the
model's ops and the step's options; the research code (models, losses, train) names no
platform. Entry points call `tune_process()` before JAX starts (XLA:CPU flags, malloc),
as they set up logging; importing ser_jax changes nothing in the process.

Lowerings, all computing the same values:
  xla     XLA's own ops (accelerators; any CPU).
  cpu     XLA with kernels.py's convolution and max-pool gradients and norm.py's BatchNorm.
  onednn  as 'cpu', with convolutions in oneDNN through jax.ffi (onednn.py), and inference
          fused with BatchNorm and ReLU (fused.py). Taken by 'auto' on a one-device CPU
          only once selftest.py has passed on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

import jax
import optax
from flax import linen as nn

from ser_jax import train
from ser_jax.config import ConfigError
from ser_jax.cpu import fused, kernels, malloc, norm, onednn, selftest, xla_flags

LOWERINGS = ("auto", "xla", "cpu", "onednn")

# The ResNet's building blocks per lowering (models.ResNet's fields); XLA's are Flax's own.
XLA_OPS: dict = {}
CPU_OPS = {
  "conv": functools.partial(nn.Conv, conv_general_dilated=kernels.conv_general_dilated),
  "norm": norm.BatchNorm,
  "max_pool": kernels.max_pool,
}
ONEDNN_OPS = {
  **CPU_OPS,
  "conv": functools.partial(nn.Conv, conv_general_dilated=onednn.conv_general_dilated),
  "block_cls": fused.FusedBasicBlock,
}


@dataclasses.dataclass(frozen=True)
class Backend:
  """How a run computes: the model's ops, and how training and evaluation wrap them."""

  lowering: str  # The lowering taken: 'xla', 'cpu' or 'onednn' (never 'auto').
  ops: dict  # models.ResNet's building blocks (block_cls, conv, norm, max_pool) or none.
  # Applied to the gradients before the optimiser's update (train.make_optimizer).
  before_update: optax.GradientTransformation | None = None
  # (apply_fn, variables, [n, batch, n_bins, n_frames] features) -> [n, batch, n_classes]
  # probabilities: train.evaluate_batches, or a backend's that reads more variables.
  evaluate: Callable = train.evaluate_batches
  # Whether the train step donates its state (XLA:CPU copies donated buffers instead).
  donate_state: bool = True

  def provenance(self) -> dict:
    """What results files record about the computation."""
    on_cpu = jax.default_backend() == "cpu"
    return {
      "backend": jax.default_backend(),
      "lowering": self.lowering,
      "onednn": onednn.version() if self.lowering == "onednn" else None,
      "cpu": selftest.cpu_model() if on_cpu else None,
    }


def after_all(tree, deps):
  """`tree`, with the same values, but computed only once every leaf of `deps` is.

  XLA:CPU runs independent operations concurrently and orders them by their buffers
  alone, so lax.optimization_barrier does not hold back its consumers. Adding zero times
  one element of each leaf of `deps` does. (A non-finite element makes `tree` NaN.)
  """
  anchor = 0.0 * sum(leaf.ravel()[0] for leaf in jax.tree.leaves(deps))
  return jax.tree.map(lambda x: x + anchor.astype(x.dtype), tree)


# oneDNN's convolutions each use every core: an optimiser update that XLA runs beside them
# slows them more than it gains, so it waits for the whole backward pass.
UPDATE_AFTER_GRADIENTS = optax.stateless(lambda grads, params=None: after_all(grads, grads))


def backend(lowering: str) -> Backend:
  """The Backend of a lowering other than 'auto', without any check."""
  on_cpu = jax.default_backend() == "cpu"
  if lowering == "xla":
    return Backend("xla", XLA_OPS, donate_state=not on_cpu)
  if lowering == "cpu":
    return Backend("cpu", CPU_OPS, donate_state=False)
  if lowering == "onednn":
    return Backend(
      "onednn",
      ONEDNN_OPS,
      before_update=UPDATE_AFTER_GRADIENTS,
      evaluate=fused.evaluate_batches,
      donate_state=False,
    )
  raise ValueError(f"unknown lowering {lowering!r}; expected one of: {', '.join(LOWERINGS)}")


def select_backend(
  lowering: str,
  make_model: Callable[[dict], object] | None = None,
  input_shapes: Sequence[tuple[int, ...]] = (),
) -> Backend:
  """The Backend for model.lowering.

  'auto' is 'xla' on accelerators, 'cpu' on CPUs with several devices, and 'onednn' on a
  one-device CPU where oneDNN runs AVX2 code or better, once the oneDNN library has built
  and its self-test has passed for the model `make_model(ops)` at `input_shapes` ([train
  batch shape, eval batch shape]); otherwise 'cpu', with one logged line saying why. 'onednn' raises OneDnnUnavailable
  where 'auto' would log that line.
  """
  if lowering in ("cpu", "onednn") and jax.default_backend() != "cpu":
    raise ConfigError(
      f"model.lowering={lowering!r} is for CPUs and this run computes on "
      f"{jax.default_backend()}; use 'auto' or 'xla'"
    )
  if lowering not in ("auto", "onednn"):
    return backend(lowering)
  if lowering == "auto" and jax.default_backend() != "cpu":
    return backend("xla")
  if lowering == "auto" and jax.device_count() > 1:
    return backend("cpu")
  reason = onednn.unavailable_reason()
  if not reason and lowering == "auto" and not onednn.runs_avx2():
    # Measured: at SSE4.1 the 'onednn' lowering trains at 0.93x and evaluates at 0.79x of
    # 'cpu' (benchmarks/NOTES.md, "Instruction sets").
    logging.warning(
      "oneDNN convolutions not used: below AVX2 (this CPU, or ONEDNN_MAX_CPU_ISA) XLA's are faster"
    )
    return backend("cpu")
  reason = reason or selftest.failure(make_model, input_shapes)
  if not reason:
    return backend("onednn")
  if lowering == "onednn":
    raise onednn.OneDnnUnavailable(f"oneDNN convolutions (model.lowering='onednn'): {reason}")
  logging.warning("oneDNN convolutions not used (XLA's instead, slower): %s", reason)
  return backend("cpu")


def tune_process() -> bool:
  """Process-wide settings for CPU speed, for entry points to call before JAX starts:
  XLA:CPU flags (xla_flags.py) and glibc malloc (malloc.py), each with its opt-out.

  Applied only where JAX will compute on the CPU (`expects_cpu`): the malloc settings slow
  compilation, which an accelerator run pays for nothing. Returns whether they were applied.
  """
  if not expects_cpu():
    return False
  xla_flags.apply()
  malloc.apply()
  return True


def expects_cpu(environ=os.environ) -> bool:
  """Whether JAX's default backend will be the CPU, told without starting JAX: JAX_PLATFORMS
  names it first, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))
