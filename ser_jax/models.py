"""ResNet for one-channel feature maps [batch, n_bins, n_frames, 1] (He et al. 2016)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ser_jax import cpu_kernels, norm, onednn


class BasicBlock(nn.Module):
  """Two 3x3 convolutions, each followed by BatchNorm; ReLU after the residual sum."""

  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  lowering: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    ops = LOWERINGS[self.lowering]
    conv = functools.partial(
      nn.Conv, use_bias=False, dtype=self.dtype, conv_general_dilated=ops.conv
    )
    batch_norm = functools.partial(
      ops.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    residual = x
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)))(x)
    y = nn.relu(batch_norm()(y))
    y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    y = batch_norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), (self.strides, self.strides), name="proj_conv")(
        residual
      )
      residual = batch_norm(name="proj_norm")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, four stages of blocks, global average pool, dense."""

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  lowering: str = "xla"  # A key of LOWERINGS: same values, other programs (see resolve_lowering).

  @nn.compact
  def __call__(self, x, train: bool):
    """Maps [batch, n_bins, n_frames, 1] features to [batch, num_classes] float32 logits."""
    ops = LOWERINGS[self.lowering]
    x = x.astype(self.dtype)
    x = nn.Conv(
      self.width,
      (7, 7),
      (2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      conv_general_dilated=ops.conv,
      name="stem_conv",
    )(x)
    x = ops.norm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="stem_norm"
    )(x)
    x = nn.relu(x)
    x = ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.dtype, self.lowering)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
MODELS = {"resnet18": ResNet18, "resnet34": ResNet34}


class Lowering(NamedTuple):
  """How the model's convolutions, BatchNorms and max-pool are lowered."""

  conv: Callable  # lax.conv_general_dilated's signature
  norm: type[nn.Module]  # nn.BatchNorm's fields and variables
  max_pool: Callable  # nn.max_pool's signature


# Every lowering computes the same values; 'cpu' and 'onednn' are the faster programs on CPUs.
LOWERINGS = {
  "xla": Lowering(jax.lax.conv_general_dilated, nn.BatchNorm, nn.max_pool),
  "cpu": Lowering(cpu_kernels.conv_general_dilated, norm.BatchNorm, cpu_kernels.max_pool),
  "onednn": Lowering(onednn.conv_general_dilated, norm.BatchNorm, cpu_kernels.max_pool),
}


def resolve_lowering(lowering: str) -> str:
  """model.lowering as a key of LOWERINGS.

  'auto' is 'onednn' on a single-device CPU backend where the oneDNN library builds,
  'cpu' on other CPU backends, and 'xla' on accelerators. 'onednn' raises
  OneDnnUnavailable when the library cannot be built.
  """
  if lowering == "onednn":
    onednn.require()
  if lowering != "auto":
    return lowering
  if jax.default_backend() != "cpu":
    return "xla"
  return "onednn" if jax.device_count() == 1 and onednn.available() else "cpu"


def create_model(model_config, num_classes: int) -> ResNet:
  dtype = jnp.bfloat16 if model_config.compute_dtype == "bfloat16" else jnp.float32
  return MODELS[model_config.name](
    num_classes=num_classes,
    width=model_config.width,
    dtype=dtype,
    lowering=resolve_lowering(model_config.lowering),
  )
