"""Per-layer timings of ResNet-18's convolutions: forward, input grad, weight grad.

For every conv geometry of ResNet-18 at one input kind and batch, times (alternating,
median of --reps) XLA's lowering of lax.conv_general_dilated and its two gradients,
the im2col/matmul formulations of variants.py, and PyTorch's channels-last conv and
aten.convolution_backward on the same shapes. GFLOP/s counts 2*MACs of the conv.

  python benchmarks/conv_ops.py --kind mfcc --batch 32
"""

from __future__ import annotations

import argparse
import statistics


import common
import jax
import jax.numpy as jnp
import numpy as np
import variants


def geometries(kind: str, batch: int):
  """(name, x shape, w shape, strides, padding) of each distinct ResNet-18 conv."""
  h, w = common.N_BINS[kind], common.N_FRAMES
  out = []
  size = lambda n, k, s, p: (n + 2 * p - k) // s + 1  # noqa: E731
  out.append(("stem 7x7/2", (batch, h, w, 1), (7, 7, 1, 64), 2, 3))
  h, w = size(h, 7, 2, 3), size(w, 7, 2, 3)
  h, w = size(h, 3, 2, 1), size(w, 3, 2, 1)
  c = 64
  for stage in range(4):
    cout = 64 * 2**stage
    if stage:
      out.append((f"s{stage + 1} 3x3/2 {c}->{cout}", (batch, h, w, c), (3, 3, c, cout), 2, 1))
      out.append((f"s{stage + 1} 1x1/2 {c}->{cout}", (batch, h, w, c), (1, 1, c, cout), 2, 0))
      h, w = size(h, 3, 2, 1), size(w, 3, 2, 1)
    out.append((f"s{stage + 1} 3x3 {cout}->{cout}", (batch, h, w, cout), (3, 3, cout, cout), 1, 1))
    c = cout
  return out


def _median_ms(fn, reps: int, inner: int) -> list[float]:
  return [1e3 * common.time_call(fn, inner) for _ in range(reps)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=sorted(common.N_BINS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--inner", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  print(common.machine_line())
  torch = None
  if not args.no_torch:
    import torch

  rng = np.random.default_rng(0)
  rows = []
  for name, x_shape, w_shape, s, p in geometries(args.kind, args.batch):
    strides, padding = (s, s), ((p, p), (p, p))
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
    y_shape = jax.eval_shape(lambda x, w: variants._lax_conv(x, w, strides, padding), x, w).shape
    dy = jnp.asarray(rng.standard_normal(y_shape, dtype=np.float32))
    gflop = 2 * np.prod(y_shape) * np.prod(w_shape[:3]) / 1e9
    fns = {}
    for how in ("lax", "im2col"):
      fns[f"fwd {how}"] = jax.jit(
        lambda x, w, how=how: variants.conv_forward(x, w, strides, padding, how)
      )
    for how in ("lax", "col2im", "im2col"):
      fns[f"dgrad {how}"] = jax.jit(
        lambda dy, w, how=how: variants.conv_dgrad(dy, w, x_shape, strides, padding, how)
      )
    for how in ("lax", "im2col"):
      fns[f"wgrad {how}"] = jax.jit(
        lambda x, dy, how=how: variants.conv_wgrad(x, dy, w_shape, strides, padding, how)
      )
    calls = {}
    for key, fn in fns.items():
      a, b = {"fwd": (x, w), "dgrad": (dy, w), "wgrad": (x, dy)}[key.split()[0]]
      fn(a, b).block_until_ready()
      calls[key] = lambda fn=fn, a=a, b=b: fn(a, b).block_until_ready()
    if torch is not None:
      tx = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last
      )
      tw = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last
      )
      tdy = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last
      )
      conv_args = ([s, s], [p, p], [1, 1], False, [0, 0], 1)

      def t_fwd(tx=tx, tw=tw, s=s, p=p):
        with torch.no_grad():
          torch.nn.functional.conv2d(tx, tw, stride=s, padding=p)

      def t_bwd(mask, tx=tx, tw=tw, tdy=tdy):
        torch.ops.aten.convolution_backward(tdy, tx, tw, None, *conv_args, mask)

      calls["fwd torch"] = t_fwd
      calls["dgrad torch"] = lambda: t_bwd([True, False, False])
      calls["wgrad torch"] = lambda: t_bwd([False, True, False])
      for c in ("fwd torch", "dgrad torch", "wgrad torch"):
        calls[c]()
    times = {k: [] for k in calls}
    for _ in range(args.reps):
      for key, call in calls.items():
        times[key].append(1e3 * common.time_call(call, args.inner))
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows.append((name, gflop, medians))
    print(f"\n{name}: x {x_shape} w {w_shape}, {gflop:.2f} GFLOP per pass")
    for key, ms in medians.items():
      print(f"  {key:14s} {ms:8.2f} ms  {gflop / ms * 1e3:7.1f} GFLOP/s")
  print("\nsum over one use of each geometry (ms):")
  keys = list(rows[0][2])
  for key in keys:
    print(f"  {key:14s} {sum(r[2][key] for r in rows):8.1f}")



if __name__ == "__main__":
  main()
