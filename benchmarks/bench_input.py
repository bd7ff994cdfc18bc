"""Input pipeline: batches/s from the memory-mapped store, and memory against corpus size.

1. Synthesises a feature store of realistic shape (N clips x n_bins x 259 frames,
   float32 memmap, with meta.json / manifest.csv so ser_jax.store.open_store opens it)
   and times input_pipeline.train_batches over an epoch, with the file's pages evicted
   first (cold, posix_fadvise DONTNEED) and cached (warm); compares with the train step.
2. Runs one epoch's data work (normalisation_stats, train_batches, eval_batches) in a
   fresh subprocess for a store of N and of 10N clips (with --with-step, after building
   and running ser_jax's train step with ser_jax.cpu.tune_process()'s settings, i.e. a
   run's footprint; without it, the data work alone: no JAX, glibc's default malloc) and
   reports peak memory: VmHWM (peak RSS, which counts mapped file pages), peak anonymous RSS
   (private memory, sampled per batch) and the file pages mapped at the end.
Readers: 'store' is ser_jax's store as opened (DiskRows: rows copied out with os.preadv);
'memmap' maps features.npy with numpy instead (what the store did before). The train
step is ser_jax's with --lowering ('auto': the one a run takes).

  python benchmarks/bench_input.py --kind mfcc --clips 2280 --batch 32 --with-step
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from ser_jax import input_pipeline
from ser_jax.store import open_store

CLASSES = ("neutral", "happiness", "sadness", "anger")
# ser_jax.cpu.LOWERINGS; that module imports JAX, which the memory children leave out
# unless --with-step asks for a train step.
LOWERINGS = ("auto", "xla", "cpu", "onednn")
N_FRAMES = 259


def make_store(path: pathlib.Path, n: int, n_bins: int, seed: int = 0) -> pathlib.Path:
  """Writes a complete synthetic store at `path` (chunked: never holds it in RAM)."""
  path.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  features = np.lib.format.open_memmap(
    path / "features.npy", mode="w+", dtype=np.float32, shape=(n, n_bins, N_FRAMES)
  )
  for start in range(0, n, 256):
    stop = min(start + 256, n)
    # log-mel-like values: a per-bin level plus noise.
    features[start:stop] = (
      rng.normal(-40.0, 15.0, (stop - start, n_bins, 1)).astype(np.float32)
      + rng.standard_normal((stop - start, n_bins, N_FRAMES), dtype=np.float32) * 5.0
    )
  features.flush()
  del features
  labels = rng.integers(0, len(CLASSES), n).astype(np.int32)
  np.save(path / "labels.npy", labels)
  np.save(path / "valid_frames.npy", rng.integers(60, N_FRAMES + 1, n).astype(np.int32))
  with open(path / "manifest.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("utt_id", "path", "label", "speaker", "group"))
    for i in range(n):
      speaker = f"spk{i % 10:02d}"
      writer.writerow(
        (f"utt{i:07d}", f"/synthetic/utt{i:07d}.wav", CLASSES[labels[i]], speaker, speaker)
      )
  with open(path / "skipped.csv", "w", newline="") as f:
    csv.writer(f).writerow(("path", "reason"))
  kind = "logmel" if n_bins == 128 else "mfcc"
  meta = {
    "format": 1,
    "corpus": "synthetic",
    "class_names": list(CLASSES),
    "n_clips": n,
    "n_skipped": 0,
    "features": {"kind": kind, "sample_rate": 22050, "hop_length": 512, "n_mels": 128},
    "n_bins": n_bins,
    "n_frames": N_FRAMES,
  }
  (path / "meta.json").write_text(json.dumps(meta, indent=1))
  return path


def evict(path: pathlib.Path) -> None:
  """Drops this file's pages from the page cache (only this file)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def epoch_rate(store, train_idx, batch: int, mean, std, epoch: int) -> float:
  start = time.perf_counter()
  n = 0
  for b in input_pipeline.train_batches(
    store, train_idx, batch, mean, std, seed=0, fold=0, epoch=epoch
  ):
    n += len(b["labels"])
  return n / (time.perf_counter() - start)


READERS = ("store", "memmap")


def open_with_reader(path, reader: str):
  """The store at `path`: as ser_jax opens it ('store', DiskRows) or as a numpy memmap."""
  store = open_store(path)
  if reader == "memmap":
    return dataclasses.replace(
      store, features=np.load(pathlib.Path(path) / "features.npy", mmap_mode="r")
    )
  return store


def _status() -> dict[str, int]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
        out[key] = int(value.split()[0]) // 1024  # MiB
  return out


def child_memory(path: str, batch: int, reader: str) -> None:
  """One epoch's data work on the store at `path`; prints peak memory as JSON."""
  start = _status()
  store = open_with_reader(path, reader)
  n = len(store)
  idx = np.random.default_rng(0).permutation(n)
  train_idx, test_idx = np.sort(idx[: int(0.8 * n)]), np.sort(idx[int(0.8 * n) :])
  peak_anon = start["RssAnon"]
  mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
  peak_anon = max(peak_anon, _status()["RssAnon"])
  batches = input_pipeline.train_batches(
    store, train_idx, batch, mean, std, seed=0, fold=0, epoch=0
  )
  for _ in batches:
    peak_anon = max(peak_anon, _status()["RssAnon"])
  for _ in input_pipeline.eval_batches(store, test_idx, 64, mean, std):
    peak_anon = max(peak_anon, _status()["RssAnon"])
  end = _status()
  print(
    json.dumps(
      {
        "reader": reader,
        "clips": n,
        "store_mib": int(np.prod(store.features.shape)) * 4 / 2**20,
        "start_rss": start["VmRSS"],
        "peak_rss": end["VmHWM"],
        "peak_anon": peak_anon,
        "end_file": end["RssFile"],
      }
    )
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", default="mfcc", choices=("mfcc", "logmel"))
  parser.add_argument("--clips", type=int, default=2280)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs (cold, then warm)")
  parser.add_argument("--scale", type=int, default=10, help="the larger store has scale x clips")
  parser.add_argument("--train-rate", type=float, default=0.0, help="train samples/s; 0: measure")
  parser.add_argument("--readers", default=",".join(READERS))
  parser.add_argument(
    "--with-step",
    action="store_true",
    help="memory children first build and run ser_jax's train step (a run's JAX footprint)",
  )
  parser.add_argument("--lowering", default="auto", choices=LOWERINGS, help="the step's")
  parser.add_argument("--dir", default="", help="where to write stores (default: a temp dir)")
  parser.add_argument("--child-memory", default="", help=argparse.SUPPRESS)
  parser.add_argument("--reader", default="store", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_memory:
    if args.with_step:
      _tune_process()
      measure_train_rate(args.kind, args.batch, args.lowering, reps=1)
    child_memory(args.child_memory, args.batch, args.reader)
    return
  _tune_process()
  import common

  load = os.getloadavg()[0]
  print(f"cpu {common.cpu_model()!r} x {os.cpu_count()} ({common.cpu_isa()}), load1 {load:.2f}")
  n_bins = 128 if args.kind == "logmel" else 40
  readers = args.readers.split(",")
  root = pathlib.Path(tempfile.mkdtemp(prefix="ser_jax_store_", dir=args.dir or None))
  try:
    small = make_store(root / "small", args.clips, n_bins)
    train_rate = args.train_rate or measure_train_rate(args.kind, args.batch, args.lowering)
    print(
      f"\ninput pipeline, {args.kind} {args.clips} clips x {n_bins} x {N_FRAMES}, "
      f"batch {args.batch}; train step {train_rate:.1f} samples/s"
    )
    train_idx = np.sort(np.random.default_rng(0).permutation(args.clips)[: int(0.8 * args.clips)])
    for reader in readers:
      store = open_with_reader(small, reader)
      mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
      evict(small / "features.npy")
      cold = epoch_rate(store, train_idx, args.batch, mean, std, 0)
      warm = np.median(
        [epoch_rate(store, train_idx, args.batch, mean, std, e) for e in range(1, args.epochs)]
      )
      print(
        f"  train_batches {reader:8s} cold cache {cold:8.0f} samples/s ({cold / train_rate:5.0f}x "
        f"the step), warm {warm:8.0f} ({warm / train_rate:5.0f}x)"
      )
      del store
    big = make_store(root / "big", args.clips * args.scale, n_bins, seed=1)
    rows = []
    for reader in readers:
      for path in (small, big):
        evict(path / "features.npy")
        cmd = [sys.executable, __file__, f"--child-memory={path}", f"--batch={args.batch}"]
        cmd += [f"--reader={reader}", f"--kind={args.kind}", f"--lowering={args.lowering}"]
        cmd += ["--with-step"] if args.with_step else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    what = "ser_jax train step + " if args.with_step else ""
    print(f"\nmemory of a process doing {what}one epoch's data work, MiB:")
    print(
      f"  {'reader':8s} {'clips':>7s} {'store':>6s} {'peak RSS':>8s} {'peak anon':>9s} "
      f"{'mapped file':>11s}"
    )
    for r in rows:
      print(
        f"  {r['reader']:8s} {r['clips']:7d} {r['store_mib']:6.0f} {r['peak_rss']:8d} "
        f"{r['peak_anon']:9d} {r['end_file']:11d}"
      )
    for a, b in zip(rows[::2], rows[1::2], strict=True):
      print(
        f"  {a['reader']:8s} growth for {args.scale}x the clips: peak RSS "
        f"{100 * (b['peak_rss'] / a['peak_rss'] - 1):+.1f}%, peak anonymous "
        f"{100 * (b['peak_anon'] / a['peak_anon'] - 1):+.1f}%"
      )
  finally:
    shutil.rmtree(root, ignore_errors=True)


def measure_train_rate(kind: str, batch: int, lowering: str, reps: int = 3) -> float:
  """samples/s of ser_jax's train step (median of `reps` repetitions of 3 steps)."""
  import common

  config = common.make_config(kind, batch)
  backend = common.select_backend(config, lowering)
  print(common.lowering_line(lowering, backend), file=sys.stderr)
  steps = common.build_steps(config, backend)
  runner = common.JaxRunner(steps, common.synthetic_batch(kind, batch))
  runner.train_many(2)
  rates = []
  for _ in range(reps):
    start = time.perf_counter()
    runner.train_many(3)
    rates.append(3 * batch / (time.perf_counter() - start))
  return float(np.median(rates))


def _tune_process() -> None:
  """ser_jax's process settings (XLA:CPU flags, malloc), as `python -m ser_jax.main` applies
  them before JAX starts; not in memory children that do the data work alone."""
  from ser_jax import cpu

  cpu.tune_process()


if __name__ == "__main__":
  main()
