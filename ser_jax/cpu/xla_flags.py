"""XLA:CPU options that ser_jax sets before JAX starts (entry points apply them through
cpu.tune_process()).

jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK by default; XNNPACK's are
faster for ResNet-18 here (benchmarks/NOTES.md). Only CPU computations are affected.
A flag the user already set in XLA_FLAGS wins, and SER_JAX_XLA_CPU_TUNING=0 turns
the tuning off. Older jaxlibs may not know these flags, so they get none.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

TUNED_CPU_FLAGS = (
  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
)
MIN_JAXLIB = (0, 10)
OPT_OUT = "SER_JAX_XLA_CPU_TUNING"


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def with_tuned_cpu_flags(xla_flags: str) -> str:
  """xla_flags plus each tuned flag whose name it does not already set."""
  for flag in TUNED_CPU_FLAGS:
    if flag.split("=")[0] + "=" not in xla_flags:
      xla_flags = f"{xla_flags} {flag}".strip()
  return xla_flags


def apply(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None):
  """Adds TUNED_CPU_FLAGS to environ['XLA_FLAGS'] unless opted out or jaxlib is too old.

  Takes effect only if JAX has not yet started its backends in this process.
  """
  if environ.get(OPT_OUT, "1") == "0":
    return
  try:
    jaxlib_version = jaxlib_version or importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if _version(jaxlib_version) < MIN_JAXLIB:
    return
  environ["XLA_FLAGS"] = with_tuned_cpu_flags(environ.get("XLA_FLAGS", ""))
