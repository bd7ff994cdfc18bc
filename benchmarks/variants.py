"""ser_jax's ResNet with the same mathematics but other lowerings of its convs and max-pool.

Each variant has the same parameter tree (names, shapes, initialisers) as
ser_jax.models.ResNet, so states, checkpoints and parameter counts are interchangeable;
only how XLA computes the convolutions, their gradients and the max-pool differs.

Convolution pieces (NHWC activations, HWIO kernels, no bias):
  fwd   'lax'    lax.conv_general_dilated (what nn.Conv does)
        'im2col' patches from pad + strided slices + concat, then one matmul
  dgrad 'lax'    autodiff of lax.conv_general_dilated
        'col2im' dy @ W^T, then overlap-add of the kh*kw column blocks (pads + adds)
        'im2col' stride 1: patches of the padded dy times the flipped kernel; else col2im
  wgrad 'lax'    autodiff of lax.conv_general_dilated
        'im2col' patches^T @ dy (one matmul over batch x positions)
Max-pool 'lax' is nn.max_pool; 'fast' is ser_jax.cpu_kernels.max_pool (the gradient from
strided slices, routed to each window's first maximum as select-and-scatter does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ser_jax import cpu_kernels, norm

_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvImpl:
  fwd: str = "lax"
  dgrad: str = "lax"
  wgrad: str = "lax"
  save_patches: bool = False  # Keep forward patches for the weight gradient (else recompute).

  @property
  def plain(self) -> bool:
    return self.fwd == self.dgrad == self.wgrad == "lax"


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // s + 1


def patches(x, kernel_hw, strides, padding):
  """[B, Ho, Wo, kh*kw*C] with feature order (kh, kw, C), matching an HWIO kernel's rows."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  _, h, w, _ = x.shape
  out_hw = (_out_size(h, kh, sh, padding[0]), _out_size(w, kw, sw, padding[1]))
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  return jnp.concatenate(cpu_kernels.window_taps(xp, kernel_hw, strides, out_hw), axis=-1)


def col2im(dpatches, x_shape, kernel_hw, strides, padding):
  """Transpose of `patches`: overlap-adds the column blocks back into [B, H, W, C]."""
  b, h, w, c = x_shape
  blocks = [dpatches[..., k * c : (k + 1) * c] for k in range(kernel_hw[0] * kernel_hw[1])]
  padded_hw = (h + sum(padding[0]), w + sum(padding[1]))
  total = cpu_kernels.overlap_add(blocks, padded_hw, kernel_hw, strides)
  return lax.slice(
    total, (0, padding[0][0], padding[1][0], 0), (b, padding[0][0] + h, padding[1][0] + w, c)
  )


def _matmul(a, b):
  return jnp.dot(a, b, preferred_element_type=a.dtype)


def conv_forward(x, w, strides, padding, how: str):
  if how == "lax":
    return _lax_conv(x, w, strides, padding)
  kh, kw, cin, cout = w.shape
  p = patches(x, (kh, kw), strides, padding)
  return _matmul(p.reshape(-1, kh * kw * cin), w.reshape(-1, cout)).reshape(*p.shape[:3], cout)


def conv_dgrad(dy, w, x_shape, strides, padding, how: str):
  kh, kw, cin, cout = w.shape
  if how == "skip":  # Ablation only (wrong gradients): the step without input gradients.
    return jnp.zeros(x_shape, dy.dtype) + 0 * dy[0, 0, 0, 0]
  if how == "lax":
    x0 = jnp.zeros(x_shape, dy.dtype)
    _, vjp = jax.vjp(lambda x: _lax_conv(x, w, strides, padding), x0)
    return vjp(dy)[0]
  if how == "im2col" and strides == (1, 1):
    # Full correlation of dy with the spatially flipped, io-swapped kernel.
    back = tuple((k - 1 - p[0], k - 1 - p[1]) for k, p in zip((kh, kw), padding, strict=True))
    wf = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2).reshape(-1, cin)
    p = patches(dy, (kh, kw), (1, 1), back)
    dx = _matmul(p.reshape(-1, kh * kw * cout), wf).reshape(*p.shape[:3], cin)
    return dx[:, : x_shape[1], : x_shape[2]]
  dpatches = lax.dot_general(dy, w.reshape(-1, cout), (((3,), (1,)), ((), ())))
  return col2im(dpatches, x_shape, (kh, kw), strides, padding)


def conv_wgrad(x, dy, w_shape, strides, padding, how: str, p=None):
  kh, kw, cin, cout = w_shape
  if how == "skip":  # Ablation only (wrong gradients): the step without weight gradients.
    return jnp.zeros(w_shape, dy.dtype) + 0 * dy[0, 0, 0, 0]
  if how == "cond2":
    # As "cond", and the gradient is also materialised in HWIO order, so the optimiser's
    # fusions read it contiguously instead of each transposing XLA's [C_in, kh, kw, C_out].
    keep = dy[0, 0, 0, 0] == dy[0, 0, 0, 0]
    x = lax.cond(keep, lambda: x, lambda: x + 0)
    w0 = jnp.zeros(w_shape, dy.dtype)
    _, vjp = jax.vjp(lambda w: _lax_conv(x, w, strides, padding), w0)
    dw = vjp(dy)[0]
    return lax.cond(keep, lambda: dw, lambda: dw + 0)
  if how in ("lax", "barrier", "cond"):
    if how == "barrier":
      x = lax.optimization_barrier(x)
    if how == "cond":
      # Both branches return x: a conditional's result is a buffer XLA cannot fuse
      # through, so the transposes for this gradient read x instead of recomputing it.
      x = lax.cond(dy[0, 0, 0, 0] == dy[0, 0, 0, 0], lambda: x, lambda: x + 0)
    w0 = jnp.zeros(w_shape, dy.dtype)
    _, vjp = jax.vjp(lambda w: _lax_conv(x, w, strides, padding), w0)
    return vjp(dy)[0]
  if how == "xt":
    # The weight gradient as the convolution XLA would build, but on an explicitly
    # transposed, materialised x ([C, H, W, B]: channels as batch, batch as features).
    xt = jnp.transpose(lax.optimization_barrier(x), (3, 1, 2, 0))
    pads = _wgrad_pads(x.shape, dy.shape, w_shape, strides, padding)
    return wgrad_from_xt(xt, dy, w_shape, strides, pads)
  if p is None:
    p = patches(x, (kh, kw), strides, padding)
  dw = lax.dot_general(
    p.reshape(-1, kh * kw * cin),
    dy.reshape(-1, cout),
    (((0,), (0,)), ((), ())),
    **_replicated(p),
  )
  return dw.reshape(w_shape).astype(dy.dtype)


def _replicated(x) -> dict:
  """out_sharding for a contraction over a batch that an explicit mesh may shard."""
  sharding = jax.typeof(x).sharding
  return {} if sharding.mesh.empty else {"out_sharding": NamedSharding(sharding.mesh, P())}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides, padding, impl: ConvImpl):
  """NHWC x HWIO convolution without bias, lowered as `impl` says."""
  return conv_forward(x, w, strides, padding, impl.fwd)


def _wgrad_pads(x_shape, y_shape, w_shape, strides, padding):
  """Padding of the weight-gradient convolution of x [B, H, W, C] with dy."""
  return tuple(
    (p[0], k + (o - 1) * s - n - p[0])
    for k, o, s, n, p in zip(w_shape[:2], y_shape[1:3], strides, x_shape[1:3], padding, strict=True)
  )


def wgrad_from_xt(xt, dy, w_shape, strides, pads):
  """dW from x already transposed to [C, H, W, B] (channels as batch, batch as features)."""
  dw = lax.conv_general_dilated(
    xt, dy, (1, 1), pads, rhs_dilation=strides, dimension_numbers=("NHWC", "IHWO", "NHWC")
  )
  return jnp.transpose(dw, (1, 2, 0, 3))


def _conv_fwd(x, w, strides, padding, impl):
  if impl.wgrad == "fwd_xt":
    # Transpose x for the weight gradient while it is produced in the forward pass.
    y = conv_forward(x, w, strides, padding, impl.fwd)
    return y, (jnp.transpose(x, (3, 1, 2, 0)), w, jnp.zeros(x.shape[:0], x.dtype))
  if impl.fwd == "im2col" and impl.save_patches and impl.wgrad == "im2col":
    kh, kw, cin, cout = w.shape
    p = patches(x, (kh, kw), strides, padding)
    y = _matmul(p.reshape(-1, kh * kw * cin), w.reshape(-1, cout)).reshape(*p.shape[:3], cout)
    return y, (x, w, p)
  return conv_forward(x, w, strides, padding, impl.fwd), (x, w, None)


def _conv_bwd(strides, padding, impl, residuals, dy):
  if impl.wgrad == "fwd_xt":
    xt, w, _ = residuals
    x_shape = (xt.shape[3], xt.shape[1], xt.shape[2], xt.shape[0])
    dx = conv_dgrad(dy, w, x_shape, strides, padding, impl.dgrad)
    pads = _wgrad_pads(x_shape, dy.shape, w.shape, strides, padding)
    return dx, wgrad_from_xt(xt, dy, w.shape, strides, pads).astype(w.dtype)
  x, w, p = residuals
  dx = conv_dgrad(dy, w, x.shape, strides, padding, impl.dgrad)
  dw = conv_wgrad(x, dy, w.shape, strides, padding, impl.wgrad, p)
  return dx, dw.astype(w.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
  """nn.Conv without bias (same 'kernel' parameter and initialiser), lowered by `impl`."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  impl: ConvImpl = ConvImpl()

  @nn.compact
  def __call__(self, x):
    assert not self.use_bias
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (*self.kernel_size, x.shape[-1], self.features),
      jnp.float32,
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides, padding = tuple(self.strides), tuple(tuple(p) for p in self.padding)
    if self.impl.plain:
      return _lax_conv(x, kernel, strides, padding)
    if self.impl.fwd == "fast":  # What nn.Conv(conv_general_dilated=...) passes.
      dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _DN)
      return cpu_kernels.conv_general_dilated(
        x, kernel, strides, padding, (1, 1), (1, 1), dn, 1, precision=None
      )
    return conv(x, kernel, strides, padding, self.impl)


class BasicBlock(nn.Module):
  """ser_jax.models.BasicBlock with a configurable convolution."""

  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  impl: ConvImpl = ConvImpl()
  fused_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    conv_ = functools.partial(Conv, use_bias=False, dtype=self.dtype, impl=self.impl)
    norm_ = functools.partial(
      norm.BatchNorm if self.fused_bn else nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
    )
    residual = x
    y = conv_(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)))(x)
    y = nn.relu(norm_()(y))
    y = conv_(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
    y = norm_(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = conv_(self.filters, (1, 1), (self.strides, self.strides), name="proj_conv")(
        residual
      )
      residual = norm_(name="proj_norm")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ser_jax.models.ResNet with configurable convolutions and max-pool."""

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  impl: ConvImpl = ConvImpl()
  stem_impl: ConvImpl = ConvImpl()
  pool: str = "lax"
  fused_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    x = Conv(
      self.width,
      (7, 7),
      (2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      impl=self.stem_impl,
      name="stem_conv",
    )(x)
    x = (norm.BatchNorm if self.fused_bn else nn.BatchNorm)(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="stem_norm"
    )(x)
    x = nn.relu(x)
    if self.pool == "fast":
      x = cpu_kernels.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.dtype, self.impl, self.fused_bn)(
          x, train
        )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


_LAX = ConvImpl()
_FAST = ConvImpl("fast", "fast", "fast")
_MM = ConvImpl("im2col", "col2im", "im2col")
VARIANTS = {
  # The integration candidate: ser_jax.cpu_kernels (what the model uses on CPU).
  "fast": dict(impl=_FAST, stem_impl=_FAST, pool="fast"),
  "fast_bn": dict(impl=_FAST, stem_impl=_FAST, pool="fast", fused_bn=True),
  "fast_stem": dict(impl=_FAST, stem_impl=ConvImpl("im2col", "lax", "im2col"), pool="fast"),
  "fast_bn_stem": dict(
    impl=_FAST, stem_impl=ConvImpl("im2col", "lax", "im2col"), pool="fast", fused_bn=True
  ),
  "lax": dict(impl=_LAX, stem_impl=_LAX, pool="lax"),
  "pool": dict(impl=_LAX, stem_impl=_LAX, pool="fast"),
  "wgrad": dict(impl=ConvImpl("lax", "lax", "im2col"), stem_impl=ConvImpl("lax", "lax", "im2col")),
  "bwd": dict(impl=ConvImpl("lax", "im2col", "im2col"), stem_impl=ConvImpl("lax", "lax", "im2col")),
  "mm": dict(impl=_MM, stem_impl=_MM, pool="lax"),
  "mm_pool": dict(impl=_MM, stem_impl=_MM, pool="fast"),
  "mm2_pool": dict(impl=ConvImpl("im2col", "im2col", "im2col"), stem_impl=_MM, pool="fast"),
  "mm_save_pool": dict(
    impl=dataclasses.replace(_MM, save_patches=True),
    stem_impl=dataclasses.replace(_MM, save_patches=True),
    pool="fast",
  ),
  "pool_xt": dict(
    impl=ConvImpl("lax", "lax", "xt"), stem_impl=ConvImpl("lax", "lax", "xt"), pool="fast"
  ),
  "pool_fxt": dict(
    impl=ConvImpl("lax", "lax", "fwd_xt"), stem_impl=ConvImpl("lax", "lax", "fwd_xt"), pool="fast"
  ),
  # Ablations (wrong gradients; for timing only): no weight / no input gradients of convs.
  "abl_no_wgrad": dict(
    impl=ConvImpl("lax", "lax", "skip"), stem_impl=ConvImpl("lax", "lax", "skip"), pool="fast"
  ),
  "abl_no_dgrad": dict(
    impl=ConvImpl("lax", "skip", "lax"), stem_impl=ConvImpl("lax", "skip", "lax"), pool="fast"
  ),
  "pool_cond": dict(
    impl=ConvImpl("lax", "lax", "cond"), stem_impl=ConvImpl("lax", "lax", "cond"), pool="fast"
  ),
  "pool_cond2": dict(
    impl=ConvImpl("lax", "lax", "cond2"), stem_impl=ConvImpl("lax", "lax", "cond2"), pool="fast"
  ),
  "pool_cond_bn": dict(
    impl=ConvImpl("lax", "lax", "cond"),
    stem_impl=ConvImpl("lax", "lax", "cond"),
    pool="fast",
    fused_bn=True,
  ),
  "pool_bn": dict(pool="fast", fused_bn=True),
  "pool_bar": dict(
    impl=ConvImpl("lax", "lax", "barrier"),
    stem_impl=ConvImpl("lax", "lax", "barrier"),
    pool="fast",
  ),
  "wgrad_pool": dict(
    impl=ConvImpl("lax", "lax", "im2col"), stem_impl=ConvImpl("lax", "lax", "im2col"), pool="fast"
  ),
  "bwd_pool": dict(
    impl=ConvImpl("lax", "im2col", "im2col"),
    stem_impl=ConvImpl("lax", "lax", "im2col"),
    pool="fast",
  ),
}


def create_model(name: str, model_config, num_classes: int) -> ResNet:
  """A variant of models.create_model(model_config, num_classes); see VARIANTS."""
  assert model_config.name == "resnet18", "variants cover ResNet-18"
  dtype = jnp.bfloat16 if model_config.compute_dtype == "bfloat16" else jnp.float32
  return ResNet(
    stage_sizes=(2, 2, 2, 2),
    num_classes=num_classes,
    width=model_config.width,
    dtype=dtype,
    **VARIANTS[name],
  )
