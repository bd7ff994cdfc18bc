"""The oneDNN self-test: a crash, a hang or a wrong value in the child costs the run only
the fast path ('auto'), or is one clear error ('onednn'); verdicts are cached."""

from __future__ import annotations

import logging
import sys

import pytest

from ser_jax import cpu
from ser_jax.cpu import onednn, selftest

pytestmark = pytest.mark.skipif(
  not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}"
)

SHAPES = [(2, 16, 24, 1), (2, 16, 24, 1)]


def make(ops):
  from ser_jax import models

  return models.ResNet18(num_classes=4, width=4, **ops)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SER_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(selftest, "_verdicts", {})
  yield tmp_path


def _child(monkeypatch, code: str) -> None:
  """Replaces the self-test child with `python -c code` (argv: calls path, verdict path)."""
  monkeypatch.setattr(
    selftest, "child_command", lambda calls, verdict: [sys.executable, "-c", code, calls, verdict]
  )


# Below AVX2 oneDNN has no gradient implementation it trusts at these shapes (XLA's run
# instead), and 'auto' takes XLA's convolutions before any self-test.
AT_LEAST_AVX2 = onednn.available() and onednn.runs_avx2()


def test_recorded_calls_cover_forward_both_gradients_and_fused_inference():
  roles = {call[0] for call in selftest.record_calls(make, SHAPES)}
  assert "forward" in roles
  assert ({"input_grad", "kernel_grad"} <= roles) == AT_LEAST_AVX2, roles
  assert roles & {"affine", "affine_relu", "affine_sum_relu"}


def test_passes_here_and_is_cached(fresh_cache, caplog, monkeypatch):
  caplog.set_level(logging.INFO)
  assert selftest.failure(make, SHAPES) == ""
  verdicts = list((fresh_cache / "onednn_selftest").glob("*.json"))
  assert len(verdicts) == 1
  assert cpu.select_backend("onednn", make, SHAPES).lowering == "onednn"
  assert cpu.select_backend("auto", make, SHAPES).lowering == ("onednn" if AT_LEAST_AVX2 else "cpu")
  selftest._verdicts.clear()
  caplog.clear()
  traced = []
  monkeypatch.setattr(selftest, "_calls_of", lambda *args: traced.append(args) or [])
  assert selftest.failure(make, SHAPES) == ""  # Read from the file: no child, no tracing.
  assert "self-test passed" not in caplog.text and not traced
  # Another model, or other shapes, is tested again.
  _child(monkeypatch, "import json, sys; open(sys.argv[2], 'w').write('{\"failure\": \"\"}')")
  wider = lambda ops: make(ops).clone(width=8)  # noqa: E731
  assert selftest.failure(wider, SHAPES) == ""
  assert selftest.failure(make, [(4, 16, 24, 1), (2, 16, 24, 1)]) == ""
  assert len(traced) == 2
  assert len(list((fresh_cache / "onednn_selftest").glob("*.json"))) == 3


@pytest.mark.parametrize(
  "code, reason",
  [
    ("import ctypes; ctypes.string_at(0)", "the self-test crashed (signal 11)"),
    (
      "import json, sys; open(sys.argv[2], 'w').write(json.dumps({'failure': 'off by 0.5'}))",
      "off by 0.5",
    ),
    ("import time; time.sleep(60)", "the self-test did not finish in 2 s"),
    ("raise SystemExit('no oneDNN here')", "the self-test failed (exit 1: no oneDNN here)"),
  ],
  ids=["crash", "wrong-values", "hang", "error"],
)
def test_a_failing_self_test_falls_back_with_one_line_or_is_an_error(
  fresh_cache, monkeypatch, caplog, code, reason
):
  _child(monkeypatch, code)
  monkeypatch.setattr(selftest, "TIMEOUT_SECONDS", 2)
  with caplog.at_level(logging.WARNING):
    backend = cpu.select_backend("auto", make, SHAPES)
  assert backend.lowering == "cpu"
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  # Below AVX2 the one line says so, before any self-test.
  said = reason if AT_LEAST_AVX2 else "below AVX2"
  assert len(warnings) == 1 and said in warnings[0] and "\n" not in warnings[0]
  with pytest.raises(
    onednn.OneDnnUnavailable, match=reason.replace("(", r"\(").replace(")", r"\)")
  ):
    cpu.select_backend("onednn", make, SHAPES)


def test_auto_leaves_onednn_below_avx2_where_xla_is_faster():
  from helpers import run_code

  code = (
    "import logging; logging.basicConfig(level=logging.WARNING)\n"
    "from ser_jax import cpu, models\n"
    "make = lambda ops: models.ResNet10(num_classes=4, width=4, **ops)\n"
    f"shapes = {SHAPES}\n"
    "print(*(cpu.select_backend(name, make, shapes).lowering for name in ('auto', 'onednn')))"
  )
  done = run_code(code, env={"ONEDNN_MAX_CPU_ISA": "SSE41"})
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["cpu", "onednn"]
  assert done.stderr.count("below AVX2") == 1
  done = run_code(code, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
  assert done.stdout.split() == ["onednn", "onednn"]
