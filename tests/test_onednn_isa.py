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

# None: whatever this CPU has. SSE4.1 machines (no AVX) run with -m slow.
ISAS = [pytest.param("SSE41", marks=pytest.mark.slow), "AVX2", None]
SHAPES = ["mfcc", "logmel", "demo", "narrow"]


@pytest.mark.parametrize("isa", ISAS, ids=lambda isa: isa or "uncapped")
def test_every_call_step_and_evaluation_match_xla(isa):
  """Every call at the configs' shapes (MFCC and log-mel at batch 32, the demo's width 16)
  and of a width-4 model (stride-2 1x1 projections with 4 input channels; the one-channel
  stem); the whole demo and width-4 models' step and evaluation."""
  if isa is None and "avx512f" not in selftest.cpu_description().split():
    pytest.skip("no AVX-512 here: oneDNN's float32 kernels uncapped are the AVX2 run's")
  done = run_python(
    [str(REPO / "tests" / "onednn_isa_check.py"), *SHAPES],
    env={"ONEDNN_MAX_CPU_ISA": isa},
    timeout=900,
  )
  assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
  problems = json.loads(done.stdout.strip().splitlines()[-1])
  assert problems == {name: [] for name in SHAPES}
