"""The oneDNN library: building it, vmapped use (sweeps), fused inference, and how
model.lowering resolves."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import randomised_batch_norms, run_code, run_module, tiny_args

from ser_jax import cpu, models, train
from ser_jax.cpu import fused, onednn

needs_onednn = pytest.mark.skipif(
  not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}"
)


def skip_below_avx2(what: str) -> None:
  """Skips the rest of a test that asserts which oneDNN calls a program makes: ser_jax sends
  a convolution to oneDNN only where oneDNN has a trusted implementation for it, and below
  AVX2 (this CPU, or ONEDNN_MAX_CPU_ISA=SSE41) it has fewer. The values are checked first."""
  if not onednn.runs_avx2():
    pytest.skip(f"{what} needs oneDNN at AVX2 or better; it runs below AVX2 here")


def test_missing_compiler_is_a_clear_error(tmp_path):
  with pytest.raises(onednn.OneDnnUnavailable, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
    onednn.build_library(tmp_path, cxx="no-such-c++")


def test_missing_onednn_root_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn.ROOT_ENV, str(tmp_path))
  with pytest.raises(onednn.OneDnnUnavailable, match="no oneapi/dnnl/dnnl.hpp"):
    onednn.onednn_prefixes()


@needs_onednn
def test_library_is_built_once_then_reused(tmp_path):
  path = onednn.build_library(tmp_path)
  built = path.stat().st_mtime_ns
  assert onednn.build_library(tmp_path) == path
  assert path.stat().st_mtime_ns == built
  assert [p.name for p in tmp_path.iterdir() if p.suffix == ".so"] == [path.name]


@needs_onednn
def test_vmapped_over_member_kernels_equals_each_member():
  """A sweep vmaps the step over members: each member's kernel sees its own input."""
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (3, 2, 6, 10, 4))
  w = jax.random.normal(kw, (3, 3, 3, 4, 8))
  strides, padding = (2, 2), ((1, 1), (1, 1))

  def loss(conv, x, w):
    y = conv(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.sin(y))

  batched = jax.jit(
    jax.vmap(jax.value_and_grad(lambda x, w: loss(onednn.conv_general_dilated, x, w), (0, 1)))
  )
  values, (dx, dw) = batched(x, w)
  for m in range(3):
    ref, (ref_dx, ref_dw) = jax.value_and_grad(
      lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1)
    )(x[m], w[m])
    np.testing.assert_allclose(values[m], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx[m], ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw[m], ref_dw, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("width", [pytest.param(4, marks=pytest.mark.slow), 64])
def test_fused_inference_equals_the_plain_model(width):
  """Eval: each convolution with its BatchNorm, ReLU and residual sum in one oneDNN call."""
  x = jax.random.normal(jax.random.key(1), (2, 40, 64, 1))
  plain = models.ResNet18(num_classes=4, width=width)
  fused_model = models.ResNet18(num_classes=4, width=width, **cpu.ONEDNN_OPS)
  variables = randomised_batch_norms(
    plain.init(jax.random.key(0), x, train=False), jax.random.key(2)
  )
  fused_eval = jax.jit(lambda v: fused_model.apply(v, x, train=False))
  expected = jax.jit(lambda v: plain.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(fused_eval(variables), expected, rtol=1e-4, atol=1e-4)
  skip_below_avx2("every fused role in the program")
  hlo = fused_eval.lower(variables).as_text()
  targets = set(re.findall(r"ser_jax_onednn_\w+", hlo))  # The stem alone is unfused.
  roles = ("forward", "affine", "affine_relu", "affine_sum_relu")
  assert targets == {f"ser_jax_onednn_{role}" for role in roles}
  if width == 64:  # At width 4 oneDNN offers only gemm for some, which run unfused instead.
    assert hlo.count("ser_jax_onednn_forward") == 1


@needs_onednn
def test_packed_kernels_give_the_same_probabilities():
  """Kernels laid out once per evaluation (fused.packed_kernels) give eval_step's values bit
  for bit; the packing program runs no convolution, and a wrong-sized kernel is refused."""
  model = models.ResNet18(num_classes=4, width=64, **cpu.ONEDNN_OPS)
  batch = {"features": jax.random.normal(jax.random.key(1), (3, 40, 72))}
  state = train.create_train_state(model, optax.sgd(0.1), jax.random.key(0), (1, 40, 72, 1))
  variables = randomised_batch_norms(
    {"params": state.params, "batch_stats": state.batch_stats}, jax.random.key(2)
  )
  state = state.replace(**variables)
  pack = jax.jit(
    lambda state, batch: fused.packed_kernels(
      state.apply_fn,
      {"params": state.params, "batch_stats": state.batch_stats},
      batch["features"][..., None],
    )
  )
  packed = pack(state, batch)
  assert list(packed) == [fused.PACKED_KERNELS]
  assert jax.tree.leaves(packed)

  def evaluate(state, batch, extra):
    variables = {**train.state_variables(state), **extra}
    return train.class_probabilities(state.apply_fn, variables, batch["features"])

  evaluate = jax.jit(evaluate)
  expected = evaluate(state, batch, {})
  np.testing.assert_array_equal(evaluate(state, batch, packed), expected)
  # The backend's evaluation packs once for a stack of batches, with the same bits.
  stacked = jnp.stack([batch["features"], batch["features"]])
  backend_evaluate = jax.jit(
    lambda state, x: fused.evaluate_batches(state.apply_fn, train.state_variables(state), x)
  )
  np.testing.assert_array_equal(backend_evaluate(state, stacked)[0], expected)
  np.testing.assert_array_equal(backend_evaluate(state, stacked)[1], expected)
  # One packed kernel of the wrong size (which ones are packed depends on the instruction set).
  leaves, tree = jax.tree.flatten(packed)
  wrong = jax.tree.unflatten(tree, [leaves[0][:-16], *leaves[1:]])
  with pytest.raises(Exception, match="pack it for the same input shape"):
    evaluate(state, batch, wrong).block_until_ready()
  skip_below_avx2("packing every convolution but the stem")
  assert len(jax.tree.leaves(packed)) == 19  # Every convolution but the stem.
  pack_hlo = pack.lower(state, batch).compile().as_text()
  assert set(re.findall(r"ser_jax_onednn_\w+", pack_hlo)) == {
    f"ser_jax_onednn_pack_{role}" for role in ("affine", "affine_relu", "affine_sum_relu")
  }


def test_other_convolutions_fall_back_to_xla():
  """bfloat16 (or grouped, dilated) convolutions are not sent to oneDNN."""
  x, w = jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 2), jnp.bfloat16)
  conv = jax.jit(
    lambda x, w: onednn.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  assert "custom_call" not in conv.lower(x, w).as_text()
  assert conv(x, w).dtype == jnp.bfloat16


@needs_onednn
@pytest.mark.parametrize("x_shape, custom_call", [((1, 4, 4, 2), True), ((1, 2, 3, 2), False)])
def test_plain_convolutions_of_maps_larger_than_the_kernel_are_custom_calls(x_shape, custom_call):
  """A 2x3 map (the last stage of 2 s clips) goes to kernels.py's matmul, which is faster."""
  if custom_call:
    skip_below_avx2("a 4x4 map's convolution as a oneDNN call")
  x, w = jnp.ones(x_shape), jnp.ones((3, 3, 2, 2))
  conv = jax.jit(
    lambda x, w: onednn.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  assert ("ser_jax_onednn_forward" in conv.lower(x, w).as_text()) == custom_call


def test_lowering_resolution(monkeypatch):
  assert cpu.select_backend("xla").lowering == "xla"
  assert cpu.select_backend("cpu").lowering == "cpu"
  # 'auto' takes oneDNN where it runs AVX2 code or better (below, XLA's convolutions are faster).
  expected = "onednn" if onednn.available() and onednn.runs_avx2() else "cpu"
  assert cpu.select_backend("auto").lowering == expected
  if onednn.available():
    monkeypatch.setattr(onednn, "runs_avx2", lambda: False)
    assert cpu.select_backend("auto").lowering == "cpu"
    assert cpu.select_backend("onednn").lowering == "onednn"
  monkeypatch.setattr(onednn, "_registered", lambda: "no C++ compiler 'g++' on PATH")
  assert cpu.select_backend("auto").lowering == "cpu"
  with pytest.raises(onednn.OneDnnUnavailable, match="no C\\+\\+ compiler"):
    cpu.select_backend("onednn")


def test_explicit_onednn_without_a_compiler_is_one_line(tmp_path):
  done = run_module(
    "ser_jax.main",
    tiny_args(tmp_path / "run", tmp_path / "cache", **{"model.lowering": "onednn"}),
    env={"CXX": "no-such-c++", "SER_JAX_CACHE": str(tmp_path / "lib")},
  )
  assert done.returncode == 2
  assert "error: oneDNN convolutions (model.lowering='onednn'): no C++ compiler" in done.stderr
  assert "no C++ compiler 'no-such-c++'" in done.stderr
  assert "Traceback" not in done.stderr


_BESIDE_TORCH = """
import json, torch
torch.nn.functional.conv2d(torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3))  # torch's oneDNN
import jax, jax.numpy as jnp, numpy as np
from ser_jax.cpu import onednn, selftest
from ser_jax import models, cpu
calls = selftest.record_calls(lambda ops: models.ResNet18(num_classes=4, width=8, **ops),
                              [(4, 24, 40, 1), (4, 24, 40, 1)])
print(json.dumps({"version": onednn.version(), "problems": [p for c in calls if (p := selftest.check_call(c))]}))
"""


@pytest.mark.parametrize("torch_global", [None, "1"], ids=["torch-local", "torch-global"])
def test_loaded_beside_pytorch_it_runs_its_own_onednn(torch_global):
  """PyTorch brings another oneDNN (3.12 in torch 2.13) and OpenMP into the process; ser_jax's
  library still calls the oneDNN it was built against, with the same values, also when
  torch makes its symbols global. Runs where torch is installed (it is not part of
  ser_jax's install, nor of CI's)."""
  pytest.importorskip("torch")
  if not onednn.available():
    pytest.skip(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  done = run_code(_BESIDE_TORCH, env={"TORCH_USE_RTLD_GLOBAL": torch_global})
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result == {"version": onednn.version(), "problems": []}
