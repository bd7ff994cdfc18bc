"""The CPU backend's lowerings: the same values and gradients as lax.conv_general_dilated and
nn.max_pool."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ser_jax import cpu
from ser_jax.config import ConfigError
from ser_jax.cpu import kernels, onednn
from ser_jax.models import ResNet18

DIMS = ("NHWC", "HWIO", "NHWC")
# (input shape, kernel shape, strides, padding): ResNet-18's kinds of convolution.
CONVS = [
  ((2, 12, 20, 1), (7, 7, 1, 4), (2, 2), ((3, 3), (3, 3))),
  ((2, 6, 10, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))),
  ((2, 6, 10, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1))),
  ((2, 6, 10, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),
  ((2, 6, 10, 4), (3, 3, 4, 8), (2, 2), ((0, 1), (1, 0))),  # Asymmetric, as 'SAME' can be.
  # Maps no larger than the kernel (patches times a matrix): the input, or only dy.
  ((2, 2, 3, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
  ((2, 1, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
  ((2, 3, 6, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1))),
  # ResNet-18's widths, for which oneDNN picks blocked kernel layouts that onednn_conv.cc
  # fills by copying blocks of O (Acdb16a, Acdb64a, Acdb48a with padding, Acdb32a), on
  # maps of at least 64 pixels (brgemm kernels) and fewer (jit kernels, ABcd16b16a).
  ((2, 12, 20, 1), (7, 7, 1, 64), (2, 2), ((3, 3), (3, 3))),
  ((2, 8, 10, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
  ((2, 4, 5, 256), (1, 1, 256, 512), (2, 2), ((0, 0), (0, 0))),
  ((2, 4, 5, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1))),
]


def _lowering(name: str) -> str:
  """name, after skipping the test where oneDNN cannot be built (the reason is shown)."""
  if name == "onednn" and not onednn.available():
    pytest.skip(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  return name


def _loss(conv, x, w, strides, padding):
  # A non-linear function of the output, so the cotangent is not constant.
  y = conv(x, w, strides, padding, dimension_numbers=DIMS)
  return jnp.sum(jnp.sin(y) * jnp.cos(3.0 * y))


@pytest.mark.parametrize("lowering", ["cpu", "onednn"])
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", CONVS)
def test_conv_value_and_gradients_equal_lax(x_shape, w_shape, strides, padding, lowering):
  kx, kw = jax.random.split(jax.random.key(0))
  # A producer before the conv (what BatchNorm + ReLU are in the model) that XLA could fuse.
  x = jax.nn.relu(jax.random.normal(kx, x_shape) - 0.2)
  w = jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))  # Outputs of order 1.
  results = []
  tuned = {"cpu": kernels.conv_general_dilated, "onednn": onednn.conv_general_dilated}[lowering]
  for conv in (jax.lax.conv_general_dilated, tuned):
    grad = jax.jit(
      jax.value_and_grad(functools.partial(_loss, conv), argnums=(0, 1)), static_argnums=(2, 3)
    )
    results.append(grad(x, w, strides, padding))
  (ref_value, (ref_dx, ref_dw)), (value, (dx, dw)) = results
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-4)
  assert np.abs(dw).max() > 0 and np.abs(dx).max() > 0


def test_maps_within_the_kernel_are_convolved_as_a_matmul():
  def primitives(x_shape):
    x, w = jnp.zeros(x_shape), jnp.zeros((3, 3, x_shape[-1], 8))
    conv = functools.partial(
      kernels.conv_general_dilated, dimension_numbers=DIMS, padding=((1, 1), (1, 1))
    )
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: conv(x, w, (1, 1)).sum(), (0, 1)))(x, w)
    return str(jaxpr)

  # XLA:CPU swaps the operands of these and runs them ~90x slower (benchmarks/NOTES.md).
  assert "conv_general_dilated" not in primitives((2, 2, 3, 8))
  assert "dot_general" in primitives((2, 2, 3, 8))
  assert "conv_general_dilated" in primitives((2, 2, 5, 8))


@pytest.mark.parametrize("shape", [(2, 9, 14, 3), (1, 10, 7, 2)])
def test_max_pool_routes_ties_like_reduce_window(shape):
  # Small integers make many windows hold their maximum more than once.
  x = jnp.round(2.0 * jax.random.normal(jax.random.key(1), shape))
  g = jax.random.normal(
    jax.random.key(2), (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
  )
  window, strides, padding = (3, 3), (2, 2), ((1, 1), (1, 1))
  outs = []
  for pool in (nn.max_pool, kernels.max_pool):
    value, vjp = jax.vjp(lambda x, pool=pool: pool(x, window, strides, padding), x)
    outs.append((value, vjp(g)[0]))
  (ref_value, ref_dx), (value, dx) = outs
  np.testing.assert_array_equal(value, ref_value)
  # An input that is the maximum of several windows sums their gradients in another order.
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(dx) < x.size  # Not every input is a maximum: routing is tested.


@pytest.mark.parametrize("lowering", ["cpu", "onednn"])
def test_resnet_lowering_same_variables_logits_and_gradients(lowering):
  """Training and eval passes of the model under `lowering` against the plain XLA model.

  The input is large enough that the last stage's BatchNorm sees 8 values: over 2, its
  gradients are ill-conditioned and rounding alone changes them by tens of percent.
  """
  shape = (4, 32, 48, 1)
  x = jax.random.normal(jax.random.key(3), shape)
  labels = jnp.arange(4)

  def loss(model, variables):
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), updates

  plain = ResNet18(num_classes=4, width=4)
  tuned = ResNet18(num_classes=4, width=4, **cpu.backend(_lowering(lowering)).ops)
  variables = plain.init(jax.random.key(0), x, train=False)
  tuned_variables = tuned.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(tuned_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(tuned_variables), strict=True):
    np.testing.assert_array_equal(a, b)
  grad = functools.partial(jax.value_and_grad, has_aux=True)
  (ref_loss, ref_stats), ref_grads = jax.jit(grad(functools.partial(loss, plain)))(variables)
  (tuned_loss, stats), grads = jax.jit(grad(functools.partial(loss, tuned)))(variables)
  np.testing.assert_allclose(tuned_loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Running averages moved off their initial values, identically.
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert not np.allclose(ref_stats["batch_stats"]["stem_norm"]["mean"], 0.0)
  # Eval mode uses the running averages.
  trained = {"params": variables["params"], **stats}
  np.testing.assert_allclose(
    jax.jit(lambda v: tuned.apply(v, x, train=False))(trained),
    jax.jit(lambda v: plain.apply(v, x, train=False))(trained),
    rtol=1e-4,
    atol=1e-5,
  )


def test_after_all_keeps_values_and_waits_for_every_dep():
  tree = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  deps = {"x": jnp.ones(4), "y": jnp.arange(3.0)}
  kept = jax.jit(cpu.after_all)(tree, deps)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(tree), strict=True):
    np.testing.assert_array_equal(a, b)
  # It reads every dep: a non-finite one reaches the result.
  poisoned = cpu.after_all(tree, {**deps, "y": jnp.array([jnp.inf, 1.0, 1.0])})
  assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(poisoned))


def test_an_accelerator_takes_xla_convolutions_and_refuses_the_cpu_lowerings(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cpu.select_backend("auto").lowering == "xla"
  for lowering in ("cpu", "onednn"):
    with pytest.raises(ConfigError, match=rf"model.lowering='{lowering}' is for CPUs .* on gpu"):
      cpu.select_backend(lowering)
