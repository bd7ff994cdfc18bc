"""ResNet-18 for one-channel feature maps: the paper's architecture and parameter count."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ser_jax.models import ResNet10, ResNet18

MFCC_SHAPE = (1, 40, 259, 1)
SMALL_SHAPE = (2, 16, 32, 1)  # Enough for behaviour that does not depend on the input size.


def _abstract_variables(model, shape=MFCC_SHAPE):
  """Variable shapes without computing anything."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


def _variables(model, shape, seed: int = 0):
  """Variables of `model.init`'s shapes and dtypes, filled from numpy.

  Running `init` op by op compiles one random kernel per parameter shape, which costs far
  more on CPU than the forward passes under test; these values are a He-style stand-in.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, shape))


# Optimisation level 0 compiles a ResNet several times faster on CPU than the default, and
# faster than running it op by op; the numerics are the same within float tolerance.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _forward(model, train: bool):
  """Compiled `model.apply`; in train mode it also returns the updated batch_stats."""
  if train:
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  else:
    apply = functools.partial(model.apply, train=False)
  return jax.jit(apply, compiler_options=FAST_COMPILE)


def _flat(tree) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  return traverse_util.flatten_dict(tree)


def test_parameter_count_is_resnet18_for_one_channel_and_four_classes():
  """11,172,292 = torchvision ResNet-18 with a 1-channel stem and a 4-way head."""
  variables = _abstract_variables(ResNet18(num_classes=4))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert n_params == 11_172_292


def test_resnet10_is_resnet18_without_each_stages_second_block():
  """ResNet-18's count less each stage's second block: two 3x3 convolutions of the stage's
  width and their BatchNorms' scales and offsets."""
  second_blocks = sum(2 * (9 * w * w + 2 * w) for w in (64, 128, 256, 512))
  variables = _abstract_variables(ResNet10(num_classes=4))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert n_params == 11_172_292 - second_blocks == 4_901_572


def test_parameter_shapes_are_stem_four_stages_of_two_blocks_and_head():
  params = _flat(_abstract_variables(ResNet18(num_classes=4))["params"])
  shapes = {"/".join(k): tuple(v.shape) for k, v in params.items()}

  assert shapes["stem_conv/kernel"] == (7, 7, 1, 64)
  assert shapes["head/kernel"] == (512, 4)
  assert shapes["head/bias"] == (4,)
  blocks = sorted({k[0] for k in params if k[0].startswith("BasicBlock_")})
  assert blocks == [f"BasicBlock_{i}" for i in range(8)]  # 4 stages x 2 basic blocks.

  in_width = 64
  for stage, width in enumerate((64, 128, 256, 512)):
    for block in range(2):
      name = f"BasicBlock_{2 * stage + block}"
      assert shapes[f"{name}/Conv_0/kernel"] == (3, 3, in_width, width)
      assert shapes[f"{name}/Conv_1/kernel"] == (3, 3, width, width)
      projected = stage > 0 and block == 0
      assert (f"{name}/proj_conv/kernel" in shapes) == projected
      if projected:
        assert shapes[f"{name}/proj_conv/kernel"] == (1, 1, in_width, width)
      in_width = width


def test_convolutions_have_no_bias():
  params = _flat(_abstract_variables(ResNet18(num_classes=4))["params"])
  conv_modules = {k[:-1] for k in params if k[-1] == "kernel" and len(params[k].shape) == 4}
  assert len(conv_modules) == 1 + 8 * 2 + 3  # Stem, two per block, three projections.
  for module in conv_modules:
    assert module + ("bias",) not in params, module
  # Only the dense head has a bias; every other bias belongs to a BatchNorm.
  biases = [k for k in params if k[-1] == "bias"]
  for key in biases:
    assert key[0] == "head" or "norm" in key[-2].lower(), key


def test_stem_is_7x7_stride_2_then_max_pool_and_stages_halve_resolution():
  model = ResNet18(num_classes=4)
  x = jnp.zeros(MFCC_SHAPE, jnp.float32)
  variables = _abstract_variables(model)

  def apply(v, x):
    return model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])

  _, state = jax.eval_shape(apply, variables, x)
  # Each module's __call__ output is stored as a one-element tuple.
  shapes = {"/".join(k): v[0].shape for k, v in _flat(state["intermediates"]).items()}
  # 40 x 259 -> stride-2 stem -> 20 x 130 -> stride-2 max-pool -> 10 x 65.
  assert shapes["stem_conv/__call__"] == (1, 20, 130, 64)
  expected = {
    0: (1, 10, 65, 64),
    1: (1, 10, 65, 64),
    2: (1, 5, 33, 128),
    3: (1, 5, 33, 128),
    4: (1, 3, 17, 256),
    5: (1, 3, 17, 256),
    6: (1, 2, 9, 512),
    7: (1, 2, 9, 512),
  }
  for block, shape in expected.items():
    assert shapes[f"BasicBlock_{block}/__call__"] == shape
  assert shapes["head/__call__"] == (1, 4)


@pytest.mark.parametrize("shape", [(2, 40, 259, 1), (2, 128, 259, 1)], ids=["mfcc", "logmel"])
def test_logits_have_shape_batch_by_classes(shape):
  model = ResNet18(num_classes=4, width=4)
  x = jax.random.normal(jax.random.key(1), shape)
  logits = _forward(model, False)(_variables(model, shape), x)
  assert logits.shape == (2, 4)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_and_returns_float32_logits():
  shape = SMALL_SHAPE
  model = ResNet18(num_classes=4, width=4, dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(_abstract_variables(model, shape)):
    assert leaf.dtype == jnp.float32
  variables = _variables(model, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  logits = _forward(model, False)(variables, x)
  assert logits.dtype == jnp.float32
  assert logits.shape == (2, 4)
  # The same parameters in float32 give nearly the same logits: only the precision differs.
  reference = _forward(ResNet18(num_classes=4, width=4), False)(variables, x)
  assert not np.array_equal(logits, reference)
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)


def test_train_mode_updates_batch_stats_with_momentum_0_9():
  shape = SMALL_SHAPE
  model = ResNet18(num_classes=4, width=4)
  variables = _variables(model, shape)
  x = 3.0 + jax.random.normal(jax.random.key(1), shape)
  logits, updates = _forward(model, True)(variables, x)
  assert logits.shape == (2, 4)
  before = _flat(variables["batch_stats"])
  after = _flat(updates["batch_stats"])
  assert before.keys() == after.keys()
  changed = [k for k in before if not np.allclose(before[k], after[k])]
  assert len(changed) == len(before)  # Every BatchNorm's running mean and variance moved.
  # Momentum 0.9 from a zero running mean: 10% of the batch mean of the stem's output.
  stem_out = jax.lax.conv_general_dilated(
    x,
    variables["params"]["stem_conv"]["kernel"],
    (2, 2),
    ((3, 3), (3, 3)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
    after[("stem_norm", "mean")], 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
  )


def test_eval_mode_uses_running_statistics():
  shape = SMALL_SHAPE
  model = ResNet18(num_classes=4, width=4)
  variables = _variables(model, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  other = x.at[1].set(10.0 * x[1] + 5.0)
  # With running statistics an example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(
    _forward(model, False)(variables, x)[0],
    _forward(model, False)(variables, other)[0],
    rtol=1e-5,
    atol=1e-5,
  )
  # In train mode they do (batch statistics), which is what makes the check above meaningful.
  train_logits = [_forward(model, True)(variables, y)[0][0] for y in (x, other)]
  assert not np.allclose(train_logits[0], train_logits[1], rtol=1e-3, atol=1e-3)
