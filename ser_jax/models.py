"""ResNet for one-channel feature maps [batch, n_bins, n_frames, 1] (He et al. 2016)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions, each followed by BatchNorm; ReLU after the residual sum.

  conv, norm: module constructors with the ResNet's shared arguments bound (dtype,
  inference or training statistics), as Flax's ResNet blocks take them.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    strides, pad = (self.strides, self.strides), ((1, 1), (1, 1))
    y = self.conv(self.filters, (3, 3), strides, padding=pad, name="Conv_0")(x)
    y = nn.relu(self.norm(name="BatchNorm_0")(y))
    residual = x
    if residual.shape != y.shape:  # The second convolution keeps y's shape.
      residual = self.conv(self.filters, (1, 1), strides, name="proj_conv")(x)
      residual = self.norm(name="proj_norm")(residual)
    y = self.conv(self.filters, (3, 3), padding=pad, name="Conv_1")(y)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros, name="BatchNorm_1")(y)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, four stages of blocks, global average pool, dense.

  block_cls, conv, norm and max_pool are the building blocks; a backend may hand in its
  own that compute the same values (ser_jax.cpu).
  """

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  block_cls: ModuleDef = BasicBlock
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  max_pool: Callable = nn.max_pool  # nn.max_pool(x, window, strides, padding)

  @nn.compact
  def __call__(self, x, train: bool):
    """Maps [batch, n_bins, n_frames, 1] features to [batch, num_classes] float32 logits."""
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(
      x.astype(self.dtype)
    )
    x = nn.relu(norm(name="stem_norm")(x))
    x = self.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    index = 0
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        filters = self.width * 2**stage
        x = self.block_cls(filters, conv, norm, strides, name=f"BasicBlock_{index}")(x)
        index += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1))
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
MODELS = {"resnet10": ResNet10, "resnet18": ResNet18, "resnet34": ResNet34}


def create_model(model_config, num_classes: int, parts: dict | None = None) -> ResNet:
  """The config's model, built from `parts` (ResNet fields: a backend's, see
  ser_jax.cpu.select_backend; none: Flax's own modules)."""
  dtype = jnp.bfloat16 if model_config.compute_dtype == "bfloat16" else jnp.float32
  return MODELS[model_config.name](
    num_classes=num_classes, width=model_config.width, dtype=dtype, **(parts or {})
  )
