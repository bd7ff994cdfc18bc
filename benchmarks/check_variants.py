"""Checks that variants.py computes what ser_jax's model computes: outputs and gradients.

  python benchmarks/check_variants.py [--variants mm_pool,...] [--batch 4]

Compares, against lax.conv_general_dilated / nn.max_pool and ser_jax.models.ResNet:
each conv piece (forward, input and weight gradients) for every layer geometry of
ResNet-18, the max-pool's value and gradient (with many ties), and for whole models
the parameter tree, logits, BatchNorm statistics and parameter gradients of the loss.
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
import variants
from flax import linen as nn

from ser_jax import cpu_kernels, losses, models

# (input shape, kernel shape, strides, padding) of every ResNet-18 conv for MFCC input.
GEOMETRIES = [
  ((2, 40, 259, 1), (7, 7, 1, 64), (2, 2), ((3, 3), (3, 3))),
  ((2, 10, 65, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
  ((2, 10, 65, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1))),
  ((2, 10, 65, 64), (1, 1, 64, 128), (2, 2), ((0, 0), (0, 0))),
  ((2, 5, 33, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1))),
  ((2, 5, 33, 128), (3, 3, 128, 256), (2, 2), ((1, 1), (1, 1))),
  ((2, 3, 17, 256), (1, 1, 256, 512), (2, 2), ((0, 0), (0, 0))),
  ((2, 2, 9, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1))),
]
IMPLS = [
  variants.ConvImpl("im2col", "col2im", "im2col"),
  variants.ConvImpl("im2col", "im2col", "im2col", save_patches=True),
  variants.ConvImpl("lax", "im2col", "im2col"),
  variants.ConvImpl("lax", "lax", "xt"),
]


def _close(name, got, want, rtol=2e-4, atol=2e-4) -> bool:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-12)
  err = np.abs(got - want).max() / scale
  ok = np.allclose(got, want, rtol=rtol, atol=atol * scale)
  print(f"  {'ok ' if ok else 'BAD'} {name:58s} max |diff|/max|ref| = {err:.2e}")
  return ok


def check_convs() -> bool:
  print("conv pieces vs lax.conv_general_dilated (float32):")
  ok = True
  rng = np.random.default_rng(0)
  for x_shape, w_shape, strides, padding in GEOMETRIES:
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, dtype=np.float32) / np.sqrt(np.prod(w_shape[:3])))

    def ref(x, w, strides=strides, padding=padding):
      return variants._lax_conv(x, w, strides, padding)

    y, vjp = jax.vjp(ref, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
    dx_ref, dw_ref = vjp(dy)
    for impl in IMPLS:
      tag = f"{x_shape[1:]} k{w_shape} s{strides[0]} {impl.fwd}/{impl.dgrad}/{impl.wgrad}"

      def fn(x, w, impl=impl, strides=strides, padding=padding):
        return variants.conv(x, w, strides, padding, impl)

      y2, vjp2 = jax.vjp(jax.jit(fn), x, w)
      dx2, dw2 = vjp2(dy)
      ok &= _close(tag + " y", y2, y)
      ok &= _close(tag + " dx", dx2, dx_ref)
      ok &= _close(tag + " dw", dw2, dw_ref)
  return ok


def check_fast_ops() -> bool:
  """nn.Conv(conv_general_dilated=cpu_kernels.conv_general_dilated) against plain nn.Conv."""
  print("cpu_kernels inside nn.Conv vs plain nn.Conv (bit-identical expected):")
  ok = True
  rng = np.random.default_rng(2)
  for x_shape, w_shape, strides, padding in GEOMETRIES:
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    kwargs = dict(features=w_shape[3], kernel_size=w_shape[:2], strides=strides, padding=padding)
    plain = nn.Conv(use_bias=False, **kwargs)
    fast = nn.Conv(use_bias=False, conv_general_dilated=cpu_kernels.conv_general_dilated, **kwargs)
    params = plain.init(jax.random.key(0), x)
    same_tree = jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(params)

    def loss(p, x, m):
      return (jnp.tanh(m.apply(p, x)) ** 2).sum()

    ref = jax.jit(jax.value_and_grad(lambda p, x, m=plain: loss(p, x, m), argnums=(0, 1)))(
      params, x
    )
    got = jax.jit(jax.value_and_grad(lambda p, x, m=fast: loss(p, x, m), argnums=(0, 1)))(params, x)
    tag = f"{x_shape[1:]} k{w_shape} s{strides[0]}"
    ok &= same_tree
    ok &= _close(tag + " loss", got[0], ref[0], 0, 0)
    ok &= _close(tag + " dx", got[1][1], ref[1][1], 0, 0)
    ok &= _close(
      tag + " dkernel", got[1][0]["params"]["kernel"], ref[1][0]["params"]["kernel"], 0, 0
    )
  return ok


_POOL = ((3, 3), (2, 2), ((1, 1), (1, 1)))  # window, strides, padding of ResNet's max-pool


def check_pool() -> bool:
  print("max-pool vs nn.max_pool (values with many ties):")
  ok = True
  rng = np.random.default_rng(1)
  for shape in [(2, 20, 130, 8), (2, 64, 130, 4), (3, 7, 9, 2)]:
    x = jnp.asarray(np.maximum(rng.integers(-3, 4, shape), 0).astype(np.float32))

    def ref(x):
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    y, vjp = jax.vjp(ref, x)
    g = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
    y2, vjp2 = jax.vjp(jax.jit(lambda x: cpu_kernels.max_pool(x, *_POOL)), x)
    ok &= _close(f"{shape} value", y2, y, 0, 0)
    # Overlapping windows add in another order: equal up to rounding, ties routed alike.
    ok &= _close(f"{shape} gradient (ties to the first maximum)", vjp2(g)[0], vjp(g)[0], 1e-6, 1e-6)
  return ok


def _worst(tree_a, tree_b) -> tuple[float, str]:
  """Largest max|a-b|/max|b| over the leaves, and that leaf's path."""
  worst, where = 0.0, ""
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(tree_a), jax.tree.leaves(tree_b), strict=True
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    if err > worst:
      worst, where = err, jax.tree_util.keystr(path)
  return worst, where


def check_models(names, batch: int) -> bool:
  """Whole-model outputs and gradients against ser_jax's model.

  float32 gradients of a deep network with BatchNorm differ in their last bits with any
  change of summation order, so the yardstick is the noise floor: the same ser_jax model
  on the same batch in reverse order (mathematically identical). A variant passes when
  its deviation is within 4x that floor (and its outputs match to 1e-5).
  """
  ok = True
  config = common.make_config("mfcc", batch)
  base = models.create_model(config.model, common.N_CLASSES)
  for kind in ("mfcc", "logmel"):
    x = jnp.asarray(common.synthetic_batch(kind, batch)["features"][..., None])
    labels = jnp.asarray(np.arange(batch) % common.N_CLASSES)
    variables = base.init(jax.random.key(0), x[:1], train=False)

    def loss(params, model, x, labels, variables=variables):
      logits, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return losses.focal_loss(logits, labels, 2.0).mean(), (logits, updates)

    def grads_of(model, x, labels, params):
      fn = jax.jit(jax.value_and_grad(lambda p: loss(p, model, x, labels), has_aux=True))
      (_, (logits, stats)), grads = fn(params)
      return logits, stats, grads

    # Non-zero last BN scales, so every block's second conv gets a gradient.
    params = jax.tree.map(lambda p: p + 0.1, variables["params"])
    logits, stats, grads = grads_of(base, x, labels, params)
    _, _, grads_rev = grads_of(base, x[::-1], labels[::-1], params)
    floor, floor_at = _worst(grads_rev, grads)
    print(
      f"{kind}, batch {batch}: noise floor (ser_jax model, batch reversed) {floor:.2e} at {floor_at}"
    )
    eval_ref = base.apply(variables, x, train=False)
    for name in names:
      model = variants.create_model(name, config.model, common.N_CLASSES)
      print(f"model variant '{name}' vs ser_jax ResNet-18, {kind}, batch {batch}:")
      mine = model.init(jax.random.key(0), x[:1], train=False)
      same_tree = jax.tree.structure(mine) == jax.tree.structure(variables) and all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(variables), strict=True)
      )
      print(f"  {'ok ' if same_tree else 'BAD'} identical parameter tree and initial values")
      ok &= same_tree
      logits2, stats2, grads2 = grads_of(model, x, labels, params)
      ok &= _close("train logits", logits2, logits, 1e-5, 1e-5)
      ok &= _close("eval logits", model.apply(variables, x, train=False), eval_ref, 1e-5, 1e-5)
      worst, where = _worst(stats2, stats)
      good = worst < 1e-5
      print(f"  {'ok ' if good else 'BAD'} {'batch_stats (worst leaf)':58s} {worst:.2e} {where}")
      worst, where = _worst(grads2, grads)
      good &= worst <= 4 * floor
      print(
        f"  {'ok ' if worst <= 4 * floor else 'BAD'} {'parameter gradients (worst leaf)':58s} "
        f"{worst:.2e} {where} (floor {floor:.2e})"
      )
      ok &= good
  return ok


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="fast")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--skip-pieces", action="store_true")
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  ok = True
  if not args.skip_pieces:
    ok &= check_convs()
    ok &= check_pool()
    ok &= check_fast_ops()
  ok &= check_models(args.variants.split(","), args.batch)
  print("ALL OK" if ok else "MISMATCHES FOUND")
  raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
  main()
