"""The oneDNN path at every instruction set it can meet, on any x86 machine.

oneDNN picks its implementations by the CPU's instruction set; ONEDNN_MAX_CPU_ISA caps
it, so SSE4.1 and AVX2 machines are tested on this one. Each check runs in a subprocess
(tests/onednn_isa_check.py): a crash fails that check, not the test run.
"""

from __future__ import annotations

import json
import platform

import pytest
from helpers import REPO, run_python

from ser_jax.cpu import onednn, selftest

pytestmark = pytest.mark.skipif(
  platform.machine() not in ("x86_64", "AMD64") or not onednn.available(),
  reason=f"oneDNN unavailable here: {onednn.unavailable_reason() or platform.machine()}",
)

# (instruction-set cap, shapes): None is whatever this CPU has. The default run caps oneDNN at
# AVX2 for a width-4 model (every call, and the whole model's step and evaluation); the demo's
# and the configs' shapes at AVX2, and SSE4.1 machines (no AVX), run with -m slow.
ALL_SHAPES = ["mfcc", "logmel", "demo", "narrow"]
CASES = [
  pytest.param("SSE41", ALL_SHAPES, marks=pytest.mark.slow, id="SSE41"),
  pytest.param("AVX2", ["narrow"], id="AVX2"),
  pytest.param("AVX2", ["mfcc", "logmel", "demo"], marks=pytest.mark.slow, id="AVX2-configs"),
  pytest.param(None, ALL_SHAPES, id="uncapped"),
]


@pytest.mark.parametrize("isa, shapes", CASES)
def test_every_call_step_and_evaluation_match_xla(isa, shapes):
  """Every call at the configs' shapes (MFCC and log-mel at batch 32) or at the demo's (width
  16) and a width-4 model's (stride-2 1x1 projections with 4 input channels; the one-channel
  stem), and the whole demo and width-4 models' step and evaluation."""
  if isa is None and "avx512f" not in selftest.cpu_description().split():
    pytest.skip("no AVX-512 here: oneDNN's float32 kernels uncapped are the AVX2 run's")
  done = run_python(
    [str(REPO / "tests" / "onednn_isa_check.py"), *shapes],
    env={"ONEDNN_MAX_CPU_ISA": isa},
    timeout=900,
  )
  assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
  problems = json.loads(done.stdout.strip().splitlines()[-1])
  assert problems == {name: [] for name in shapes}
