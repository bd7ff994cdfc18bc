"""BatchNorm whose training-mode gradient XLA:CPU runs in fewer passes over memory.

`BatchNorm` has nn.BatchNorm's variables, initialisers and formulas (batch mean and
E[x^2] - mean^2 over all but the channel axis, in float32). Only its VJP differs: it is
written in closed form from two per-channel sums, sum(g) and sum(g * x), so no
`x - mean` map is materialised for the backward pass, and the input gradient is one
element-wise pass, dx = g * a + x * c1 + c0 with per-channel a, c1, c0.
(Autodiff of nn.BatchNorm makes XLA:CPU write `x - mean` because its reductions cannot
fuse a broadcast subtraction; measurements: benchmarks/NOTES.md, experiment 17.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


def _stats_dtype(x):
  """float32, or float64 for float64 inputs: statistics are never taken in half precision."""
  return jnp.promote_types(x.dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalise(x, scale, bias, epsilon: float):
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(_stats_dtype(x))
  mean = xf.mean(axes)
  var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  a = scale * inv
  y = xf * a + (bias - mean * a)
  return (y.astype(x.dtype), mean, var), (x, mean, inv, scale)


def _backward(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  g = cotangents[0].astype(_stats_dtype(x))  # mean and var carry no gradient (batch_norm).
  xf = x.astype(g.dtype)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  sum_g = g.sum(axes)
  dscale = inv * ((g * xf).sum(axes) - mean * sum_g)
  a = scale * inv
  c1 = -a * inv * dscale / n
  c0 = -a * sum_g / n - c1 * mean
  return (g * a + xf * c1 + c0).astype(x.dtype), dscale, sum_g


_normalise.defvjp(_forward, _backward)


def batch_norm(x, scale, bias, epsilon: float):
  """(y, batch mean, batch variance) of x normalised over all axes but the last.

  The statistics are returned for the running averages and carry no gradient.
  """
  y, mean, var = _normalise(x, scale, bias, epsilon)
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


class BatchNorm(nn.Module):
  """nn.BatchNorm (same variables, initialisers and values) with batch_norm's VJP."""

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", self.scale_init, features, jnp.float32)
    bias = self.param("bias", self.bias_init, features, jnp.float32)
    if self.use_running_average:
      a = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return (x.astype(_stats_dtype(x)) * a + (bias - ra_mean.value * a)).astype(self.dtype)
    y, mean, var = batch_norm(x.astype(self.dtype), scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
