"""ResNet for one-channel feature maps [batch, n_bins, n_frames, 1] (He et al. 2016)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ser_jax import cpu_kernels, norm, onednn

# The collection of kernels laid out for oneDNN's fused inference (see conv_norm).
PACKED_KERNELS = "onednn_kernels"


def conv_norm(
  x, conv: nn.Conv, batch_norm: nn.Module, relu: bool, residual=None, fused: bool = False
):
  """relu?(batch_norm(conv(x)) (+ residual)); `fused`: in one oneDNN call (inference only).

  The fused call reads the two modules' variables, as they would, without running them:
  BatchNorm's running statistics become a per-channel scale and shift applied, with
  ReLU and the residual sum, as the convolution writes its output (benchmarks/NOTES.md,
  experiment 27). When PACKED_KERNELS is mutable, the kernel is also stored there in the
  layout the call reads for this input shape; when it holds one, that one is read.
  """
  if not fused:
    y = batch_norm(conv(x))
    y = y if residual is None else residual + y
    return nn.relu(y) if relu else y
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
  if conv.is_mutable_collection(PACKED_KERNELS):
    packed = onednn.pack_kernel(kernel, x.shape, strides, padding, relu, residual is not None)
    conv.put_variable(PACKED_KERNELS, "kernel", packed)
  elif conv.has_variable(PACKED_KERNELS, "kernel"):
    kernel = conv.get_variable(PACKED_KERNELS, "kernel")
  return onednn.conv_affine(x, kernel, scale, shift, strides, padding, relu, residual, kernel_shape)


def packed_kernels(apply_fn, variables, inputs) -> dict:
  """conv_norm's kernels laid out for oneDNN on `inputs`' shape ({} where inference is not
  fused). Under jit only the layout work is compiled: the model's outputs are unused."""
  _, packed = apply_fn(variables, inputs, train=False, mutable=[PACKED_KERNELS])
  return packed.get(PACKED_KERNELS, {})


def with_packed_kernels(variables: dict, packed: dict | None) -> dict:
  """`variables` for inference that reads `packed` (from packed_kernels) when given."""
  return {**variables, PACKED_KERNELS: packed} if packed else variables


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
    fused = _fuses(self, train)
    strides = (self.strides, self.strides)
    y = conv_norm(
      x,
      conv(self.filters, (3, 3), strides, padding=((1, 1), (1, 1))),
      batch_norm(),
      True,
      None,
      fused,
    )
    second_conv = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    second_norm = batch_norm(scale_init=nn.initializers.zeros)
    residual = x
    if residual.shape != y.shape:  # The second convolution keeps y's shape.
      residual = conv_norm(
        x,
        conv(self.filters, (1, 1), strides, name="proj_conv"),
        batch_norm(name="proj_norm"),
        False,
        None,
        fused,
      )
    return conv_norm(y, second_conv, second_norm, True, residual, fused)


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
    # The stem is never fused (conv_norm): XLA fuses its BatchNorm and ReLU with the
    # max-pool, and oneDNN 3.2 runs this one-channel convolution slower with post-ops.
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


def _fuses(module: nn.Module, train: bool) -> bool:
  """Whether inference runs each convolution with its BatchNorm as one oneDNN call."""
  return (
    not train
    and module.lowering == "onednn"
    and module.dtype == jnp.float32
    and not module.is_initializing()
  )


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
