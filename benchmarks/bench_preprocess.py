"""Preprocessing throughput: ser_jax.store.build_store vs a plain single-process librosa loop.

Reads a corpus listing (default: EmoDB at /work/shared/data/emodb; --generate N writes
N synthetic 16 kHz wavs instead), then times, each on a fresh temporary cache dir:
  librosa loop   librosa.load(sr=22050) + melspectrogram (+ mfcc), one process
  build_store    num_workers=1 and num_workers=<cores> (read, resample, features, write)
and prints clips/s and speed-ups against the librosa loop. num_workers > 1 uses a
spawn process pool, so its figure includes starting the workers (imports, first calls).

  python benchmarks/bench_preprocess.py --kind mfcc [--limit 200]

Like `python -m ser_jax.preprocess`, it leaves the process as it is (no
ser_jax.cpu.tune_process(): preprocessing runs no JAX).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import tempfile
import time

import librosa
import numpy as np
import soundfile

from ser_jax.config import default_config
from ser_jax.data import corpora
from ser_jax.data.corpus import Corpus, Utterance
from ser_jax.features import FeatureParams
from ser_jax.store import build_store, open_store

PAPER_CLASSES = tuple(default_config().data.classes)


def librosa_loop(corpus: Corpus, params: FeatureParams) -> np.ndarray:
  """The reference: what a plain script does, one clip after another."""
  out = []
  for u in corpus.utterances:
    y, sr = librosa.load(u.path, sr=params.sample_rate)
    y = librosa.util.fix_length(y[: params.max_samples], size=params.max_samples)
    mel = librosa.feature.melspectrogram(
      y=y, sr=sr, n_fft=params.n_fft, hop_length=params.hop_length, n_mels=params.n_mels
    )
    log_mel = librosa.power_to_db(mel, ref=1.0, top_db=80.0)
    feats = (
      log_mel if params.kind == "logmel" else librosa.feature.mfcc(S=log_mel, n_mfcc=params.n_mfcc)
    )
    out.append(feats.astype(np.float32))
  return np.stack(out)


def generated_corpus(root: pathlib.Path, n: int, seed: int = 0) -> Corpus:
  """n wavs of 1.5-5 s at 16 kHz (EmoDB's rate) with speech-like noise bursts."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  utterances = []
  for i in range(n):
    length = int(rng.uniform(1.5, 5.0) * 16000)
    envelope = np.abs(np.sin(np.linspace(0, rng.uniform(3, 12), length)))
    wave = (rng.standard_normal(length) * envelope * 0.1).astype(np.float32)
    path = root / f"clip{i:05d}.wav"
    soundfile.write(path, wave, 16000, subtype="PCM_16")
    label = PAPER_CLASSES[i % 4]
    utterances.append(Utterance(f"clip{i:05d}", str(path), label, f"s{i % 10}", f"s{i % 10}"))
  return Corpus("generated", PAPER_CLASSES, tuple(utterances))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="/work/shared/data/emodb")
  parser.add_argument("--kind", default="mfcc", choices=("mfcc", "logmel"))
  parser.add_argument("--limit", type=int, default=0, help="use the first N clips (0: all)")
  parser.add_argument("--generate", type=int, default=0, help="use N generated wavs instead")
  parser.add_argument("--workers", default=f"1,{os.cpu_count()}")
  parser.add_argument(
    "--all-classes", action="store_true", help="EmoDB's 7 classes, not the default 4"
  )
  args = parser.parse_args()
  # Here, not at the top: spawned workers import this module, and common imports JAX.
  import common

  print(f"cpu {common.cpu_model()!r} x {os.cpu_count()} ({common.cpu_isa()})")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="ser_jax_pre_"))
  try:
    if args.generate:
      corpus = generated_corpus(tmp / "wavs", args.generate)
    else:
      classes = () if args.all_classes else PAPER_CLASSES  # (): every class.
      corpus = corpora.read_corpus("emodb", args.root, classes)
    if args.limit:
      corpus = dataclasses.replace(corpus, utterances=corpus.utterances[: args.limit])
    params = FeatureParams(kind=args.kind)
    n = len(corpus.utterances)
    info = soundfile.info(corpus.utterances[0].path)
    print(
      f"corpus {corpus.name}: {n} clips (first: {info.samplerate} Hz, {info.channels} ch); "
      f"features {args.kind} at {params.sample_rate} Hz; {os.cpu_count()} cores; "
      f"load1 {os.getloadavg()[0]:.2f}"
    )
    # Warm-up (imports, FFT plans) so the reference is not charged for first calls.
    librosa_loop(dataclasses.replace(corpus, utterances=corpus.utterances[:2]), params)
    start = time.perf_counter()
    reference = librosa_loop(corpus, params)
    base = n / (time.perf_counter() - start)
    print(f"  {'librosa loop, 1 process':28s} {base:7.1f} clips/s   1.00x")
    for workers in (int(w) for w in args.workers.split(",")):
      cache = tmp / f"cache_{workers}"
      start = time.perf_counter()
      path = build_store(corpus, params, cache, num_workers=workers, progress=False)
      rate = n / (time.perf_counter() - start)
      print(
        f"  {f'build_store num_workers={workers}':28s} {rate:7.1f} clips/s   {rate / base:.2f}x"
      )
      store = open_store(path)
      if len(store) == n:
        diff = np.abs(np.asarray(store.features) - reference).max()
        print(f"  {'':28s} max |store - librosa loop| = {diff:.2e}")
      del store
      shutil.rmtree(cache, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
