"""Per-layer timings of ResNet-18's convolutions: forward, input grad, weight grad.

For every conv geometry of ResNet-18 at one input kind and batch, times (alternating,
waiting for a quiet machine, median of --reps) XLA's lowering of
lax.conv_general_dilated and its two gradients, ser_jax.onednn's, the im2col/matmul formulations of
variants.py (and their parts: building the patches, the bare matmul), and PyTorch's
channels-last conv and aten.convolution_backward on the same shapes.
GFLOP/s counts 2 * multiply-adds of the convolution.

  python benchmarks/conv_ops.py --kind mfcc --batch 32 --impls lax,onednn
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
import variants

from ser_jax import onednn


def geometries(kind: str, batch: int):
  """(name, x shape, w shape, stride, pad) of each distinct ResNet-18 conv.

  Stage 1 has four 3x3 convs of its geometry; stages 2-4 have one strided 3x3, one 1x1
  projection and three 3x3 convs each (see count).
  """

  def size(n, k, s, p):
    return (n + 2 * p - k) // s + 1

  h, w = common.N_BINS[kind], common.N_FRAMES
  out = [("stem 7x7/2", (batch, h, w, 1), (7, 7, 1, 64), 2, 3)]
  h, w = size(h, 7, 2, 3), size(w, 7, 2, 3)
  h, w = size(h, 3, 2, 1), size(w, 3, 2, 1)
  c = 64
  for stage in range(4):
    cout = 64 * 2**stage
    if stage:
      out.append((f"s{stage + 1} 3x3/2 {c}-{cout}", (batch, h, w, c), (3, 3, c, cout), 2, 1))
      out.append((f"s{stage + 1} 1x1/2 {c}-{cout}", (batch, h, w, c), (1, 1, c, cout), 2, 0))
      h, w = size(h, 3, 2, 1), size(w, 3, 2, 1)
    out.append((f"s{stage + 1} 3x3 {cout}-{cout}", (batch, h, w, cout), (3, 3, cout, cout), 1, 1))
    c = cout
  return out


def count(name: str) -> int:
  """How many convs of this geometry ResNet-18 has."""
  if name.startswith("stem") or "/2" in name:
    return 1
  return 4 if name.startswith("s1") else 3


def jax_calls(
  x_shape, w_shape, stride, pad, rng, keep=("lax", "im2col", "col2im", "patches", "matmul")
):
  """{name: zero-argument blocking call} for one geometry, and its GFLOP."""
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))
  x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
  w = jnp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
  y_shape = jax.eval_shape(lambda x, w: variants._lax_conv(x, w, strides, padding), x, w).shape
  dy = jnp.asarray(rng.standard_normal(y_shape, dtype=np.float32))
  kh, kw, cin, cout = w_shape
  fns = {
    "fwd lax": (lambda x, w: variants.conv_forward(x, w, strides, padding, "lax"), x, w),
    "fwd im2col": (lambda x, w: variants.conv_forward(x, w, strides, padding, "im2col"), x, w),
    "  patches": (lambda x, w: variants.patches(x, (kh, kw), strides, padding), x, w),
    "  matmul": (
      lambda p, w: jnp.dot(p, w),
      jnp.ones((int(np.prod(y_shape[:3])), kh * kw * cin), jnp.float32),
      w.reshape(-1, cout),
    ),
    "dgrad lax": (
      lambda dy, w: variants.conv_dgrad(dy, w, x_shape, strides, padding, "lax"),
      dy,
      w,
    ),
    "dgrad col2im": (
      lambda dy, w: variants.conv_dgrad(dy, w, x_shape, strides, padding, "col2im"),
      dy,
      w,
    ),
    "dgrad im2col": (
      lambda dy, w: variants.conv_dgrad(dy, w, x_shape, strides, padding, "im2col"),
      dy,
      w,
    ),
    "wgrad lax": (
      lambda x, dy: variants.conv_wgrad(x, dy, w_shape, strides, padding, "lax"),
      x,
      dy,
    ),
    "wgrad im2col": (
      lambda x, dy: variants.conv_wgrad(x, dy, w_shape, strides, padding, "im2col"),
      x,
      dy,
    ),
  }
  if "onednn" in keep:
    fns.update(_onednn_fns(x, w, dy, strides, padding))
  calls = {}
  fns = {k: v for k, v in fns.items() if k.split()[-1] in keep}
  for name, (fn, a, b) in fns.items():
    jitted = jax.jit(fn)
    jitted(a, b).block_until_ready()
    calls[name] = lambda jitted=jitted, a=a, b=b: jitted(a, b).block_until_ready()
  gflop = 2 * np.prod(y_shape) * kh * kw * cin / 1e9
  return calls, gflop, (np.asarray(x), np.asarray(w), np.asarray(dy))


def _onednn_fns(x, w, dy, strides, padding):
  """ser_jax.onednn's forward pass and gradients (what model.lowering='onednn' runs)."""

  def conv(x, w):
    return onednn.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  return {
    "fwd onednn": (conv, x, w),
    "dgrad onednn": (lambda dy, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0], dy, w),
    "wgrad onednn": (lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0], x, dy),
  }


def torch_calls(arrays, stride, pad):
  import torch

  x, w, dy = arrays
  cl = torch.channels_last
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=cl)
  tdy = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  conv_args = ([stride, stride], [pad, pad], [1, 1], False, [0, 0], 1)

  def fwd():
    with torch.no_grad():
      torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)

  def bwd(mask):
    torch.ops.aten.convolution_backward(tdy, tx, tw, None, *conv_args, mask)

  calls = {
    "fwd torch": fwd,
    "dgrad torch": lambda: bwd([True, False, False]),
    "wgrad torch": lambda: bwd([False, True, False]),
  }
  for call in calls.values():
    call()
  return calls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=sorted(common.N_BINS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--inner", type=int, default=3)
  parser.add_argument("--layers", default="", help="comma-separated name prefixes to keep")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--n-frames", type=int, default=common.N_FRAMES, help="input width")
  parser.add_argument(
    "--impls", default="lax", help="JAX lowerings: lax,onednn,im2col,col2im,patches,matmul"
  )
  args = parser.parse_args()
  common.N_FRAMES = args.n_frames
  print(common.machine_line())
  rng = np.random.default_rng(0)
  totals = {}
  for name, x_shape, w_shape, stride, pad in geometries(args.kind, args.batch):
    if args.layers and not any(name.startswith(p) for p in args.layers.split(",")):
      continue
    calls, gflop, arrays = jax_calls(
      x_shape, w_shape, stride, pad, rng, tuple(args.impls.split(","))
    )
    if not args.no_torch:
      calls.update(torch_calls(arrays, stride, pad))
    samples = {key: common.Samples() for key in calls}
    for _ in range(args.reps):
      for key, call in calls.items():
        samples[key].measure(lambda call=call: 1e3 * common.time_call(call, args.inner))
    print(f"\n{name}: x {x_shape} w {w_shape}, {gflop:.2f} GFLOP per pass")
    for key, s in samples.items():
      ms = s.median
      if not (name.startswith("stem") and key.startswith("dgrad")):
        totals[key] = totals.get(key, 0.0) + ms * count(name)
      print(f"  {key:14s} {ms:8.2f} ms  {gflop / ms * 1e3:7.1f} GFLOP/s   {s}")
  print("\nwhole network: sum over ResNet-18's 20 convs (ms; the stem's input gradient excluded):")
  for key, ms in totals.items():
    print(f"  {key:14s} {ms:8.1f}")


if __name__ == "__main__":
  main()
