"""norm.BatchNorm: nn.BatchNorm's variables, values, running averages and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.test_util import check_grads

from ser_jax.cpu import norm


def _modules(**fields):
  return nn.BatchNorm(**fields), norm.BatchNorm(**fields)


def _loss(module, params, batch_stats, x):
  y, updates = module.apply(
    {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
  )
  # Non-linear in y, so the cotangent differs per element.
  return jnp.sum(jnp.sin(y) * jnp.cos(2.0 * y)), (y, updates["batch_stats"])


@pytest.mark.parametrize("offset", [0.0, 3.0])  # 3.0: a mean six times the spread.
def test_train_mode_values_statistics_and_gradients_equal_flax(offset):
  x = offset + 0.5 * jax.random.normal(jax.random.key(0), (4, 6, 10, 8))
  fields = dict(use_running_average=False, momentum=0.9, epsilon=1e-5)
  reference, fast = _modules(**fields)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(1), x)) == jax.tree.map(
    jnp.shape, variables
  )
  params = {
    "scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (8,)),
    "bias": 0.1 * jax.random.normal(jax.random.key(3), (8,)),
  }
  results = []
  for module in (reference, fast):
    grad = jax.grad(functools.partial(_loss, module), argnums=(0, 2), has_aux=True)
    results.append(jax.jit(grad)(params, variables["batch_stats"], x))
  ((ref_dparams, ref_dx), (ref_y, ref_stats)), ((dparams, dx), (y, stats)) = results
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(stats["mean"], 0.0)  # The running mean moved.
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-3)
  for a, b in zip(jax.tree.leaves(dparams), jax.tree.leaves(ref_dparams), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
  assert np.abs(dx).max() > 1e-2


def test_float64_gradient_matches_autodiff_and_finite_differences():
  def loss(normalise, x, scale, bias):
    return jnp.sum(jnp.tanh(normalise(x, scale, bias)) * jnp.arange(4.0))

  def textbook(x, scale, bias):
    mean, var = x.mean((0, 1)), x.var((0, 1))
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

  def closed_form(x, scale, bias):
    return norm.batch_norm(x, scale, bias, 1e-5)[0]

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(4), (3, 5, 4), jnp.float64)
    args = (x, jnp.linspace(0.5, 1.5, 4), jnp.linspace(-0.2, 0.2, 4))
    grads = jax.grad(functools.partial(loss, closed_form), argnums=(0, 1, 2))(*args)
    expected = jax.grad(functools.partial(loss, textbook), argnums=(0, 1, 2))(*args)
    for a, b in zip(grads, expected, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    check_grads(functools.partial(loss, closed_form), args, order=1, modes=["rev"], eps=1e-6)


def test_eval_mode_uses_running_statistics_like_flax():
  x = jax.random.normal(jax.random.key(5), (2, 3, 4, 6))
  reference, fast = _modules(use_running_average=True)
  variables = {
    "params": {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.linspace(-1.0, 1.0, 6)},
    "batch_stats": {"mean": jnp.linspace(-0.3, 0.3, 6), "var": jnp.linspace(0.5, 4.0, 6)},
  }
  np.testing.assert_allclose(
    fast.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
  )


def test_bfloat16_compute_and_vmap_over_members():
  x = jax.random.normal(jax.random.key(6), (2, 4, 6, 5, 3))  # [members, batch, h, w, c]
  scale = jnp.stack([jnp.ones(3), 2.0 * jnp.ones(3)])
  bias = jnp.zeros((2, 3))

  def member_loss(x, scale, bias):
    y, _, _ = norm.batch_norm(x.astype(jnp.bfloat16), scale, bias, 1e-5)
    assert y.dtype == jnp.bfloat16
    return jnp.sum(y.astype(jnp.float32) ** 3)

  grads = jax.jit(jax.vmap(jax.grad(member_loss, argnums=(1, 2))))(x, scale, bias)
  for member in range(2):
    expected = jax.grad(member_loss, argnums=(1, 2))(x[member], scale[member], bias[member])
    for a, b in zip(grads, expected, strict=True):
      np.testing.assert_allclose(a[member], b, rtol=1e-5)
  assert not np.allclose(grads[0][0], grads[0][1])  # Members differ.
