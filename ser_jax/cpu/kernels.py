"""ResNet's convolution and max-pool with gradients that XLA:CPU lowers faster.

Values and gradients are those of lax.conv_general_dilated and nn.max_pool (up to the
order of float sums); only the program that computes them differs (measurements:
benchmarks/NOTES.md).

- `conv_general_dilated`: the weight gradient reads a materialised copy of the input.
  Left alone, XLA fuses the input's producer (BatchNorm, ReLU, residual add) into the
  transposes that feed the weight-gradient convolution and recomputes it there.
  Feature maps no larger than the kernel (the last stage of 2 s clips: 2x3) are
  convolved as patches times a matrix: XLA:CPU swaps the operands of such convolutions
  and runs them about 90x slower.
- `max_pool`: the maximum of the window's strided slices, which XLA fuses with the
  input's producer (BatchNorm, ReLU). The gradient goes to each window's first maximum
  in row-major order, as reduce_window's own gradient does, but from strided slices and
  pads instead of the select-and-scatter that XLA:CPU expands into index tuples and a
  scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _hashable(value):
  """Lists (e.g. padding pairs) as tuples; named tuples such as ConvDimensionNumbers kept."""
  if isinstance(value, list) or type(value) is tuple:
    return tuple(_hashable(v) for v in value)
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
  """lax.conv_general_dilated (same signature) with the VJP described in the module doc."""
  options = tuple(
    _hashable(v)
    for v in (
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  )
  return _conv(lhs, rhs, options)


def _lax_conv(lhs, rhs, options):
  strides, padding, lhs_dil, rhs_dil, dims, groups, batch_groups, precision, out_type = options
  return lax.conv_general_dilated(
    lhs,
    rhs,
    strides,
    padding,
    lhs_dil,
    rhs_dil,
    dims,
    groups,
    batch_groups,
    precision=precision,
    preferred_element_type=out_type,
  )


def is_plain_nhwc(lhs_shape, rhs_shape, dims, lhs_dilation, rhs_dilation, groups, batch_groups):
  """Whether a convolution is an ungrouped, undilated NHWC x HWIO -> NHWC one."""
  nhwc_hwio = lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
  return (
    dims is not None
    and lax.conv_dimension_numbers(lhs_shape, rhs_shape, dims) == nhwc_hwio
    and groups == batch_groups == 1
    and all(d is None or set(d) == {1} for d in (lhs_dilation, rhs_dilation))
  )


def within_kernel(map_shape, kernel_shape) -> bool:
  """Whether an NHWC map is no larger than the HWIO kernel in every spatial dimension."""
  return all(m <= k for m, k in zip(map_shape[1:3], kernel_shape[:2], strict=True))


def output_hw(in_hw, kernel_hw, strides, padding) -> tuple[int, int]:
  """Spatial output size of a convolution with explicit ((lo, hi), (lo, hi)) padding."""
  return tuple(
    (n + lo + hi - k) // s + 1
    for n, (lo, hi), k, s in zip(in_hw, padding, kernel_hw, strides, strict=True)
  )


def _within_kernel(map_shape, options, kernel_shape) -> bool:
  """Whether a plain convolution's NHWC map is no larger than its kernel (see within_kernel)."""
  strides, padding, lhs_dil, rhs_dil, dims, groups, batch_groups, *_ = options
  plain = not isinstance(padding, str) and is_plain_nhwc(
    map_shape, kernel_shape, dims, lhs_dil, rhs_dil, groups, batch_groups
  )
  return plain and within_kernel(map_shape, kernel_shape)


def window_taps(xp, window, strides, out_hw):
  """The window's taps as strided slices of padded NHWC xp, in row-major window order."""
  b, _, _, c = xp.shape
  (ho, wo), (sh, sw) = out_hw, strides
  return [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
    )
    for i in range(window[0])
    for j in range(window[1])
  ]


def overlap_add(blocks, padded_hw, window, strides):
  """The transpose of window_taps: each tap's [B, Ho, Wo, C] block summed into [B, Hp, Wp, C]."""
  (hp, wp), (sh, sw) = padded_hw, strides
  ho, wo = blocks[0].shape[1:3]
  zero = jnp.zeros((), blocks[0].dtype)
  total = None
  for k, block in enumerate(blocks):
    i, j = divmod(k, window[1])
    placed = lax.pad(
      block,
      zero,
      (
        (0, 0, 0),
        (i, hp - i - (ho - 1) * sh - 1, sh - 1),
        (j, wp - j - (wo - 1) * sw - 1, sw - 1),
        (0, 0, 0),
      ),
    )
    total = placed if total is None else total + placed
  return total


def _matmul_conv(lhs, rhs, options):
  """The NHWC x HWIO convolution as [patches] @ [kh * kw * C_in, C_out]."""
  strides, padding, *_, precision, out_type = options
  kh, kw, c_in, c_out = rhs.shape
  out_hw = output_hw(lhs.shape[1:3], (kh, kw), strides, padding)
  xp = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  patches = jnp.concatenate(window_taps(xp, (kh, kw), strides, out_hw), axis=-1)
  return lax.dot_general(
    patches,
    rhs.reshape(kh * kw * c_in, c_out),
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=out_type,
  )


def _forward(lhs, rhs, options):
  if _within_kernel(lhs.shape, options, rhs.shape):
    return _matmul_conv(lhs, rhs, options)
  return _lax_conv(lhs, rhs, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs, rhs, options):
  return _forward(lhs, rhs, options)


def _conv_fwd(lhs, rhs, options):
  return _forward(lhs, rhs, options), (lhs, rhs)


def _materialised(x, like):
  """x as a buffer that XLA cannot fuse x's producer through: a conditional's result.

  Both branches return x; the predicate depends on `like`, so XLA cannot fold it away.
  """
  keep = like.ravel()[0] == like.ravel()[0]
  return lax.cond(keep, lambda: x, lambda: x + 0)


def _conv_bwd(options, residuals, dy):
  lhs, rhs = residuals
  # The input gradient convolves dy with the kernel: a small dy takes the slow path too.
  if _within_kernel(lhs.shape, options, rhs.shape) or _within_kernel(dy.shape, options, rhs.shape):
    _, vjp = jax.vjp(lambda x, w: _matmul_conv(x, w, options), lhs, rhs)
    return vjp(dy)
  lhs = _materialised(lhs, rhs)
  _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, options), lhs, rhs)
  return vjp(dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, padding):
  """nn.max_pool(x, window, strides, padding) of NHWC x; padding is ((top, bottom), (left, right))."""
  return _window_max(_pad(x, padding), window, strides)


def _pad(x, padding):
  return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)


def _window_max(xp, window, strides):
  """The maximum of the window's taps of padded xp: one fusion with xp's producer, where
  XLA:CPU's reduce_window is a separate, slower pass (benchmarks/NOTES.md, experiment 21)."""
  out_hw = output_hw(xp.shape[1:3], window, strides, ((0, 0), (0, 0)))
  return functools.reduce(jnp.maximum, window_taps(xp, window, strides, out_hw))


def _max_pool_fwd(x, window, strides, padding):
  # The padded input is the residual: the forward pass writes it anyway, once.
  xp = _pad(x, padding)
  return _window_max(xp, window, strides), xp


def _max_pool_bwd(window, strides, padding, xp, g):
  (top, bottom), (left, right) = padding
  b, hp, wp, c = xp.shape
  # XLA may recompute xp's producer for the backward pass with other rounding than the
  # forward's, so the maxima are taken again here from the same taps they are matched to.
  taps = window_taps(_materialised(xp, g), window, strides, g.shape[1:3])
  out = functools.reduce(jnp.maximum, taps)
  taken = jnp.zeros(out.shape, bool)
  routed = []
  for tap in taps:
    first = (tap == out) & ~taken
    taken = taken | first
    routed.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
  total = overlap_add(routed, (hp, wp), window, strides)
  return (lax.slice(total, (0, top, left, 0), (b, hp - bottom, wp - right, c)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
