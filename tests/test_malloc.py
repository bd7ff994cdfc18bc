"""malloc: importing ser_jax makes glibc reuse freed large blocks instead of unmapping them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ser_jax import malloc

# Allocates, writes and frees 64 MiB twice; prints the page faults of the second time.
_CODE = """
import ctypes, resource, ser_jax
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


def _second_touch_faults(**env) -> int:
  environ = {k: v for k, v in os.environ.items() if k != malloc.OPT_OUT} | env
  out = subprocess.run([sys.executable, "-c", _CODE], env=environ, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
  # 64 MiB is 16,384 pages of 4 KiB: an unmapped block faults on every one of them again.
  assert _second_touch_faults() < 1000


def test_opt_out_leaves_malloc_alone():
  assert not malloc.apply({malloc.OPT_OUT: "0"})
