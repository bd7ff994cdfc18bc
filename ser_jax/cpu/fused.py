"""Inference with each residual-block convolution, its BatchNorm, the residual sum and
ReLU as one oneDNN call, reading kernels laid out for oneDNN once per evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ser_jax import models, train
from ser_jax.cpu import onednn

# The variable collection of kernels laid out for oneDNN's fused inference.
PACKED_KERNELS = "onednn_kernels"


def conv_norm(x, conv: nn.Conv, batch_norm: nn.Module, relu: bool, residual=None, train=True):
  """models.conv_norm; at inference in float32, one oneDNN call (oneDNN post-ops).

  The fused call reads the two modules' variables, as they would, without running them:
  BatchNorm's running statistics become a per-channel scale and shift applied, with
  ReLU and the residual sum, as the convolution writes its output (benchmarks/NOTES.md).
  When PACKED_KERNELS is mutable, the kernel is also stored there in the layout the call
  reads for this input shape; when it holds one, that one is read.
  """
  if train or conv.dtype != jnp.float32 or conv.is_initializing():
    return models.conv_norm(x, conv, batch_norm, relu, residual)
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
    return models.conv_norm(x, conv, batch_norm, relu, residual)
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
