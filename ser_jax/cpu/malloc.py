"""glibc malloc settings that keep XLA:CPU's per-step buffers in the process.

XLA:CPU allocates a step's large temporaries with malloc and frees them after it. By
default glibc hands such blocks back to the kernel (mmap/munmap, and MADV_DONTNEED on
its per-thread heaps), so the next step touches fresh pages: over 100,000 page faults
per log-mel train step here. With one arena, no mmap and no trimming, freed blocks are
reused (benchmarks/NOTES.md, experiment 19). The price is slower compilation (about 35 %:
XLA's compiler threads share the one arena). The entry points apply this through
ser_jax.cpu.tune_process() where JAX computes on the CPU (importing ser_jax changes nothing),
on Linux with glibc, unless SER_JAX_MALLOC_TUNING=0; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h) and their values here. A trim threshold of -1
# turns trimming off; any positive one (at most 2**31 - 1) still let the heap shrink
# after a log-mel batch-64 step freed its 2.6 GiB (benchmarks/NOTES.md, experiment 24).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
OPT_OUT = "SER_JAX_MALLOC_TUNING"


def apply(environ: Mapping[str, str] = os.environ) -> bool:
  """Applies SETTINGS with mallopt; whether they were applied."""
  if environ.get(OPT_OUT, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # Each setting is tried, even after one is refused.
  applied = [mallopt(param, value) == 1 for param, value in SETTINGS]
  return all(applied)
