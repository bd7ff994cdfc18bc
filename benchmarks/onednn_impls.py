"""Every avx512 implementation oneDNN offers for each of ResNet-18's convolutions, timed.

oneDNN picks the first implementation it lists for a problem; this times all of them
(`onednn_impls.cc`, compiled here against ser_jax's oneDNN), which is how the small-map
rule of benchmarks/NOTES.md, experiment 28 was found. ms per call, best of 5 x 10 calls.

  python benchmarks/onednn_impls.py --kind mfcc --batch 32
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import tempfile

import common

from ser_jax import onednn

SOURCE = pathlib.Path(__file__).with_name("onednn_impls.cc")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", choices=sorted(common.N_BINS), default="mfcc")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  include, lib = onednn.onednn_prefixes()
  with tempfile.TemporaryDirectory() as tmp:
    binary = pathlib.Path(tmp) / "onednn_impls"
    compile_command = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-fopenmp"]
    compile_command += [f"-I{include}", str(SOURCE), "-o", str(binary)]
    compile_command += [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
    subprocess.run(compile_command, check=True)
    print(
      f"{args.kind}, batch {args.batch}: input {common.N_BINS[args.kind]}x{common.N_FRAMES}",
      flush=True,
    )
    subprocess.run([str(binary), str(args.batch), str(common.N_BINS[args.kind])], check=True)


if __name__ == "__main__":
  main()
