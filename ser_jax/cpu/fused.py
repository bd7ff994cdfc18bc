"""Inference with each residual-block convolution, its BatchNorm, the residual sum and
ReLU as one oneDNN call, reading kernels laid out for oneDNN once per evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from ser_jax import models, train
from ser_jax.cpu import onednn

# The variable collection of kernels laid out for oneDNN's fused inference.
PACKED_KERNELS = "onednn_kernels"


class FusedBasicBlock(models.BasicBlock):
  """models.BasicBlock, with the same variables and values; at inference in float32 each
  convolution, its BatchNorm, the residual sum and ReLU are one oneDNN call."""

  @nn.compact
  def __call__(self, x):
    strides, pad = (self.strides, self.strides), ((1, 1), (1, 1))
    first_norm = self.norm(name="BatchNorm_0")
    fuse = functools.partial(conv_norm, train=not first_norm.use_running_average)
    y = fuse(x, self.conv(self.filters, (3, 3), strides, padding=pad, name="Conv_0"), first_norm)
    residual = x
    if residual.shape != y.shape:
      projection = self.conv(self.filters, (1, 1), strides, name="proj_conv")
      residual = fuse(x, projection, self.norm(name="proj_norm"), relu=False)
    second_norm = self.norm(scale_init=nn.initializers.zeros, name="BatchNorm_1")
    second = self.conv(self.filters, (3, 3), padding=pad, name="Conv_1")
    return fuse(y, second, second_norm, residual=residual)


def _conv_norm(x, conv, batch_norm, relu: bool, residual):
  """relu?(batch_norm(conv(x)) (+ residual)), as models.BasicBlock computes each."""
  y = batch_norm(conv(x))
  y = y if residual is None else residual + y
  return nn.relu(y) if relu else y


def conv_norm(x, conv: nn.Conv, batch_norm: nn.Module, relu=True, residual=None, train=True):
  """relu?(batch_norm(conv(x)) (+ residual)); at inference in float32, one oneDNN call
  (oneDNN post-ops).

  The fused call reads the two modules' variables, as they would, without running them:
  BatchNorm's running statistics become a per-channel scale and shift applied, with
  ReLU and the residual sum, as the convolution writes its output (benchmarks/NOTES.md).
  When PACKED_KERNELS is mutable, the kernel is also stored there in the layout the call
  reads for this input shape; when it holds one, that one is read.
  """
  if train or conv.dtype != jnp.float32 or conv.is_initializing():
    return _conv_norm(x, conv, batch_norm, relu, residual)
  kernel = conv.variables["params"]["kernel"]
  stats, params = batch_norm.variables["batch_stats"], batch_norm.variables["params"]
  scale = params["scale"] * jax.lax.rsqrt(stats["var"] + batch_norm.epsilon)
  shift = params["bias"] - stats["mean"] * scale
  strides = conv.strides or 1
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  padding = conv.padding
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  kernel_shape = kernel.shape
  role = onednn.affine_role(relu, residual is not None)
  if not onednn.trusted(role, x.shape, kernel_shape, strides, padding):
    return _conv_norm(x, conv, batch_norm, relu, residual)
  if conv.is_mutable_collection(PACKED_KERNELS):
    packed = onednn.pack_kernel(kernel, x.shape, strides, padding, relu, residual is not None)
    conv.put_variable(PACKED_KERNELS, "kernel", packed)
  elif conv.has_variable(PACKED_KERNELS, "kernel"):
    kernel = conv.get_variable(PACKED_KERNELS, "kernel")
  return onednn.conv_affine(x, kernel, scale, shift, strides, padding, relu, residual, kernel_shape)


def packed_kernels(apply_fn, variables: dict, inputs: jax.Array) -> dict:
  """{PACKED_KERNELS: kernels laid out for `inputs`' shape}, to add to the variables of
  inference. Under jit only the layout work is compiled: the model's outputs are unused."""
  _, packed = apply_fn(variables, inputs, train=False, mutable=[PACKED_KERNELS])
  return {PACKED_KERNELS: packed[PACKED_KERNELS]} if PACKED_KERNELS in packed else {}


def evaluate_batches(apply_fn, variables: dict, features: jax.Array) -> jax.Array:
  """train.evaluate_batches with the kernels laid out once for the batches' shape."""
  packed = packed_kernels(apply_fn, variables, features[0][..., None])
  return train.evaluate_batches(apply_fn, {**variables, **packed}, features)
