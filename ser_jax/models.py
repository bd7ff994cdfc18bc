"""ResNet for one-channel feature maps [batch, n_bins, n_frames, 1] (He et al. 2016)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn


def conv_norm(x, conv: nn.Conv, batch_norm: nn.Module, relu: bool, residual=None, train=True):
  """relu?(batch_norm(conv(x)) (+ residual)): each convolution of a residual block."""
  del train  # Ops that fuse inference (ser_jax.cpu) use it.
  y = batch_norm(conv(x))
  y = y if residual is None else residual + y
  return nn.relu(y) if relu else y


class Ops(NamedTuple):
  """The operations the ResNet is built from; a backend may hand in its own (ser_jax.cpu).

  Every set computes the same values; only the programs differ.
  """

  conv: Callable = jax.lax.conv_general_dilated  # lax.conv_general_dilated's signature
  norm: type[nn.Module] = nn.BatchNorm  # nn.BatchNorm's fields and variables
  max_pool: Callable = nn.max_pool  # nn.max_pool(x, window, strides, padding)
  conv_norm: Callable = conv_norm  # conv_norm's signature


XLA_OPS = Ops()


class BasicBlock(nn.Module):
  """Two 3x3 convolutions, each followed by BatchNorm; ReLU after the residual sum."""

  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  ops: Ops = XLA_OPS

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(
      nn.Conv, use_bias=False, dtype=self.dtype, conv_general_dilated=self.ops.conv
    )
    batch_norm = functools.partial(
      self.ops.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    conv_norm = functools.partial(self.ops.conv_norm, train=train)
    strides = (self.strides, self.strides)
    pad = ((1, 1), (1, 1))
    y = conv_norm(x, conv(self.filters, (3, 3), strides, padding=pad), batch_norm(), True)
    residual = x
    if residual.shape != y.shape:  # The second convolution keeps y's shape.
      projection = conv(self.filters, (1, 1), strides, name="proj_conv")
      residual = conv_norm(x, projection, batch_norm(name="proj_norm"), False)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    second_norm = batch_norm(scale_init=nn.initializers.zeros)
    return conv_norm(y, conv(self.filters, (3, 3), padding=pad), second_norm, True, residual)


class ResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, four stages of blocks, global average pool, dense."""

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  ops: Ops = XLA_OPS

  @nn.compact
  def __call__(self, x, train: bool):
    """Maps [batch, n_bins, n_frames, 1] features to [batch, num_classes] float32 logits."""
    x = x.astype(self.dtype)
    x = nn.Conv(
      self.width,
      (7, 7),
      (2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      conv_general_dilated=self.ops.conv,
      name="stem_conv",
    )(x)
    x = self.ops.norm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="stem_norm"
    )(x)
    x = nn.relu(x)
    x = self.ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.dtype, self.ops)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
MODELS = {"resnet18": ResNet18, "resnet34": ResNet34}


def create_model(model_config, num_classes: int, ops: Ops = XLA_OPS) -> ResNet:
  """The config's model, built from `ops` (a backend's, see ser_jax.cpu.select_backend)."""
  dtype = jnp.bfloat16 if model_config.compute_dtype == "bfloat16" else jnp.float32
  return MODELS[model_config.name](
    num_classes=num_classes, width=model_config.width, dtype=dtype, ops=ops
  )
