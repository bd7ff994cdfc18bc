"""malloc: cpu.tune_process() makes glibc reuse freed large blocks instead of unmapping them;
importing ser_jax alone leaves malloc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ser_jax.cpu import malloc

# Allocates, writes and frees 64 MiB twice; prints the page faults of the second time.
_CODE = """
import ctypes, resource, sys, ser_jax.cpu
if sys.argv[1:] == ["tune"]:
  ser_jax.cpu.tune_process()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def touch(size=64 << 20):
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_touch_faults(tune: bool = True, **env) -> int:
  environ = {k: v for k, v in os.environ.items() if k != malloc.OPT_OUT} | env
  args = [sys.executable, "-c", _CODE, *(["tune"] if tune else [])]
  out = subprocess.run(args, env=environ, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
  # 64 MiB is 16,384 pages of 4 KiB: an unmapped block faults on every one of them again.
  assert _second_touch_faults() < 1000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_importing_ser_jax_leaves_malloc_alone():
  # glibc's default returns a 64 MiB block to the kernel: it faults on every page again.
  assert _second_touch_faults(tune=False) > 10000


def test_opt_out_leaves_malloc_alone():
  assert not malloc.apply({malloc.OPT_OUT: "0"})
