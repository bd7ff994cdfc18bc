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
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

import jax

from ser_jax import models
from ser_jax.cpu import fused, kernels, malloc, norm, onednn, selftest, xla_flags

LOWERINGS = ("auto", "xla", "cpu", "onednn")

# Most sweep members a CPU trains in one vmapped program. A vmapped step runs each member's
# convolutions as separate calls, so it gains little over one member at a time and costs
# memory per member. benchmarks/bench_sweep.py (--n_frames 130, batch 32, oneDNN lowering,
# 2-core AMD EPYC shared with other jobs, load 1-7), vmapped / sequential samples/s, two runs:
#   width 16, 8 steps: 3 members 0.78x, 1.02x (1.43x, 1.28x earlier at load 1); 6: 1.13x, 0.85x
#   width 64, 4 steps: 3 members 1.10x, 0.98x; 6 members 0.92x, 0.82x
# No gain beyond the noise, and a loss at full width; XLA puts a width-64 step at 331 MiB
# per member. So a CPU trains one member at a time.
CPU_MEMBERS_PER_CHUNK = 1

XLA_OPS = models.XLA_OPS
CPU_OPS = models.Ops(kernels.conv_general_dilated, norm.BatchNorm, kernels.max_pool)
ONEDNN_OPS = models.Ops(
  onednn.conv_general_dilated, norm.BatchNorm, kernels.max_pool, fused.conv_norm
)


@dataclasses.dataclass(frozen=True)
class Backend:
  """How a run computes: the model's ops and the train and eval steps' options."""

  lowering: str  # The lowering taken: 'xla', 'cpu' or 'onednn' (never 'auto').
  ops: models.Ops
  # Applied to the gradients before the optimiser update (train.train_step's hook).
  gradients_hook: Callable | None = None
  # (apply_fn, variables, inputs) -> variable collections that inference reads besides
  # params and batch_stats (oneDNN's kernel layouts); None: nothing to add.
  inference_variables: Callable | None = None
  # Whether the train step donates its state (XLA:CPU copies donated buffers instead).
  donate_state: bool = True
  # Most sweep members trained in one program; 0: as many as fit in memory.
  max_members_per_chunk: int = 0

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


def _update_after_gradients(grads):
  # oneDNN's convolutions each use every core: an optimiser update that XLA runs beside
  # them slows them more than it gains, so it waits for the whole backward pass.
  return after_all(grads, grads)


def backend(lowering: str) -> Backend:
  """The Backend of a lowering other than 'auto', without any check."""
  if lowering == "xla":
    if jax.default_backend() != "cpu":
      return Backend("xla", XLA_OPS)
    return Backend("xla", XLA_OPS, donate_state=False, max_members_per_chunk=CPU_MEMBERS_PER_CHUNK)
  if lowering == "cpu":
    return Backend("cpu", CPU_OPS, donate_state=False, max_members_per_chunk=CPU_MEMBERS_PER_CHUNK)
  if lowering == "onednn":
    return Backend(
      "onednn",
      ONEDNN_OPS,
      gradients_hook=_update_after_gradients,
      inference_variables=fused.packed_kernels,
      donate_state=False,
      max_members_per_chunk=CPU_MEMBERS_PER_CHUNK,
    )
  raise ValueError(f"unknown lowering {lowering!r}; expected one of: {', '.join(LOWERINGS)}")


def select_backend(
  lowering: str,
  make_model: Callable[[models.Ops], object] | None = None,
  input_shapes: Sequence[tuple[int, ...]] = (),
) -> Backend:
  """The Backend for model.lowering.

  'auto' is 'xla' on accelerators, 'cpu' on CPUs with several devices, and 'onednn' on a
  one-device CPU where oneDNN runs AVX2 code or better, once the oneDNN library has built
  and its self-test has passed for the model `make_model(ops)` at `input_shapes` ([train
  batch shape, eval batch shape]); otherwise 'cpu', with one logged line saying why. 'onednn' raises OneDnnUnavailable
  where 'auto' would log that line.
  """
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
