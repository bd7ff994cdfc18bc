"""Faster CPU lowerings for ser_jax.models with the same mathematics (drop-in pieces).

1. XNNPACK convolutions: XLA:CPU (jax 0.10) runs convolutions through YNNPACK by
   default; XNNPACK's are faster here. `enable_xnnpack_convolutions()` adds the two
   XLA flags; it must run before JAX initialises its CPU backend.
2. `conv_general_dilated`: lax.conv_general_dilated whose backward pass reads a
   materialised copy of the input. XLA otherwise fuses the input's producer (BatchNorm,
   ReLU, residual add) into the transposes that feed the weight-gradient convolution,
   and those fused transposes re-read several tensors in transposed order. Pass it to
   nn.Conv(conv_general_dilated=...); values and gradients are bit-identical.
3. `max_pool`: nn.max_pool's value from strided slices, with a VJP that routes each
   window's gradient to its first maximum in row-major order, as reduce_window's
   select-and-scatter does; XLA:CPU expands that into index tuples and a scatter.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

XNNPACK_CONV_FLAGS = (
  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
)


def enable_xnnpack_convolutions() -> None:
  """Appends XNNPACK_CONV_FLAGS to XLA_FLAGS (a user's own setting of them wins)."""
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in XNNPACK_CONV_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags


def _static(value):
  """Hashable form of a padding / stride argument (lists become tuples)."""
  if isinstance(value, list | tuple):
    return tuple(_static(v) for v in value)
  return value


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """lax.conv_general_dilated; its VJP takes the weight gradient from a materialised lhs."""
  options = (
    _static(window_strides),
    _static(padding),
    _static(lhs_dilation),
    _static(rhs_dilation),
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    precision,
    preferred_element_type,
  )
  return _conv(lhs, rhs, options)


def _lax_conv(lhs, rhs, options):
  strides, padding, lhs_dil, rhs_dil, dn, groups, batch_groups, precision, out_type = options
  return lax.conv_general_dilated(
    lhs,
    rhs,
    strides,
    padding,
    lhs_dil,
    rhs_dil,
    dn,
    groups,
    batch_groups,
    precision=precision,
    preferred_element_type=out_type,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs, rhs, options):
  return _lax_conv(lhs, rhs, options)


def _conv_fwd(lhs, rhs, options):
  return _lax_conv(lhs, rhs, options), (lhs, rhs)


def _conv_bwd(options, residuals, dy):
  lhs, rhs = residuals
  # Both branches return lhs; a conditional's result is a buffer that XLA cannot fuse
  # through, so the transposed copy for the weight gradient is read from memory. The
  # predicate depends on the (replicated) kernel, so XLA cannot fold it away.
  keep = rhs.ravel()[0] == rhs.ravel()[0]
  lhs = lax.cond(keep, lambda: lhs, lambda: lhs + 0)
  _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, options), lhs, rhs)
  return vjp(dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _out_size(size: int, window: int, stride: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - window) // stride + 1


def _windows(xp, window, strides, out_hw):
  """The window's taps as strided slices of the padded input, in row-major window order."""
  b, _, _, c = xp.shape
  (ho, wo), (sh, sw) = out_hw, strides
  return [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
    )
    for i in range(window[0])
    for j in range(window[1])
  ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))):
  """nn.max_pool(x, window, strides, padding) for NHWC x with explicit padding pairs."""
  return _max_pool(x, window, strides, padding)[0]


def _max_pool(x, window, strides, padding):
  _, h, w, _ = x.shape
  out_hw = tuple(
    _out_size(n, k, s, p) for n, k, s, p in zip((h, w), window, strides, padding, strict=True)
  )
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  taps = _windows(xp, window, strides, out_hw)
  return functools.reduce(jnp.maximum, taps), out_hw


def _max_pool_fwd(x, window, strides, padding):
  out, _ = _max_pool(x, window, strides, padding)
  return out, (x, out)


def _max_pool_bwd(window, strides, padding, residuals, g):
  x, out = residuals
  b, h, w, c = x.shape
  (ho, wo), (sh, sw) = out.shape[1:3], strides
  (ph0, ph1), (pw0, pw1) = padding
  hp, wp = h + ph0 + ph1, w + pw0 + pw1
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  taken = jnp.zeros(out.shape, bool)
  zero = jnp.zeros((), g.dtype)
  total = None
  for k, tap in enumerate(_windows(xp, window, strides, (ho, wo))):
    i, j = divmod(k, window[1])
    first = (tap == out) & ~taken
    taken = taken | first
    placed = lax.pad(
      jnp.where(first, g, zero),
      zero,
      (
        (0, 0, 0),
        (i, hp - i - (ho - 1) * sh - 1, sh - 1),
        (j, wp - j - (wo - 1) * sw - 1, sw - 1),
        (0, 0, 0),
      ),
    )
    total = placed if total is None else total + placed
  return (lax.slice(total, (0, ph0, pw0, 0), (b, ph0 + h, pw0 + w, c)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
