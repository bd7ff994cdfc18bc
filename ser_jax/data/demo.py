"""A small synthetic emotional-speech corpus, so the pipeline runs with no download.

Each utterance is a source-filter imitation of speech: a jittered glottal pulse
train, shaped into syllables and passed through speaker- and vowel-dependent
formant resonators, with fricative bursts, pauses and background noise. The four
classes differ only in prosody (pitch level and range, loudness, tempo, spectral
tilt, pauses, attack sharpness) relative to each speaker's baseline, with
per-utterance spread comparable to the class separation, so the task is
learnable but not trivial.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import soundfile as sf

DEMO_CLASSES = ("neutral", "happiness", "sadness", "anger")

# The paper's IEMOCAP shares: improvised, excitement not merged into happiness (1,099 / 284 /
# 608 / 289 of 2,280 utterances).
_CLASS_SHARES = (0.48, 0.12, 0.27, 0.13)
_FORMAT_VERSION = 1
_MIN_SECONDS, _MAX_SECONDS = 1.5, 3.5

# Adult male formants F1..F3 in Hz (Peterson & Barney); speakers scale them.
_VOWELS = np.array(
  [
    [730.0, 1090.0, 2440.0],  # /a/
    [270.0, 2290.0, 3010.0],  # /i/
    [300.0, 870.0, 2240.0],  # /u/
    [530.0, 1840.0, 2480.0],  # /e/
    [570.0, 840.0, 2410.0],  # /o/
    [660.0, 1720.0, 2410.0],  # /ae/
  ]
)
# Higher formants hardly depend on the vowel; they keep the upper band from going dark.
_UPPER_FORMANTS = np.array([3300.0, 3750.0])
_BANDWIDTHS = np.array([80.0, 110.0, 160.0, 250.0, 300.0])


@dataclasses.dataclass(frozen=True)
class _Prosody:
  """Class means of the prosodic parameters; pitch and loudness are relative to the speaker."""

  pitch_st: float  # mean F0 shift in semitones
  range_st: float  # sd of syllable pitch accents in semitones
  gain_db: float  # loudness change
  rate: float  # syllables per second
  tilt_hz: float  # glottal low-pass corner: higher is brighter
  pause_s: float  # mean pause between syllables
  attack_s: float  # syllable onset time


_PROSODY = {
  "neutral": _Prosody(0.0, 1.5, 0.0, 4.0, 250.0, 0.10, 0.030),
  "happiness": _Prosody(4.5, 4.5, 5.0, 5.1, 410.0, 0.06, 0.015),
  "sadness": _Prosody(-3.5, 0.75, -8.0, 2.8, 135.0, 0.30, 0.060),
  "anger": _Prosody(3.0, 3.4, 9.0, 5.3, 620.0, 0.05, 0.006),
}


@dataclasses.dataclass(frozen=True)
class _Speaker:
  """Speaker baseline: F0, vocal-tract scale, loudness and voice quality."""

  f0: float
  tract_scale: float
  gain_db: float
  tilt_scale: float
  jitter: float


def write_demo_corpus(
  root: str | os.PathLike,
  *,
  n_utterances: int = 320,
  n_speakers: int = 8,
  sample_rate: int = 16000,
  seed: int = 0,
) -> pathlib.Path:
  """Writes the demo corpus (wav files, manifest.csv, demo.json) under `root` unless present."""
  root = pathlib.Path(root)
  params = {
    "version": _FORMAT_VERSION,
    "n_utterances": n_utterances,
    "n_speakers": n_speakers,
    "sample_rate": sample_rate,
    "seed": seed,
  }
  if _is_complete(root, params):
    return root
  labels = _assign_labels(n_utterances, n_speakers, seed)
  tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  (tmp / "wav").mkdir(parents=True)
  speakers = _make_speakers(n_speakers, seed)
  rows = []
  for index, (spk, number, label) in enumerate(labels):
    rng = np.random.default_rng([seed, index])
    audio = _synthesize(rng, speakers[spk], _PROSODY[label], sample_rate)
    utt_id = f"spk{spk:02d}_{number:04d}"
    rel = f"wav/{utt_id}.wav"
    sf.write(tmp / rel, audio, sample_rate, subtype="PCM_16")
    rows.append((utt_id, rel, label, f"spk{spk:02d}", f"spk{spk:02d}"))
  rows.sort()
  # The manifest and parameters go last: their presence marks a finished corpus.
  with open(tmp / "manifest.csv", "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(("utt_id", "path", "label", "speaker", "group"))
    writer.writerows(rows)
  (tmp / "demo.json").write_text(json.dumps(params, sort_keys=True) + "\n")
  if _is_complete(root, params):
    # Another process finished the same corpus meanwhile; keep theirs.
    shutil.rmtree(tmp)
    return root
  shutil.rmtree(root, ignore_errors=True)
  try:
    os.replace(tmp, root)
  except OSError:
    # Another process put its copy in place between the removal and the rename.
    shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(root, params):
      raise
  return root


def is_demo_corpus(root: str | os.PathLike) -> bool:
  """Whether `root` holds a finished demo corpus of this format (of any size or seed)."""
  try:
    stored = json.loads((pathlib.Path(root) / "demo.json").read_text())
  except (OSError, ValueError):
    return False
  return (
    stored.get("version") == _FORMAT_VERSION and (pathlib.Path(root) / "manifest.csv").is_file()
  )


def _is_complete(root: pathlib.Path, params: dict[str, int]) -> bool:
  try:
    stored = json.loads((root / "demo.json").read_text())
  except (OSError, ValueError):
    return False
  return stored == params and (root / "manifest.csv").is_file()


def _assign_labels(n_utterances: int, n_speakers: int, seed: int) -> list[tuple[int, int, str]]:
  """Deterministic (speaker, per-speaker number, label) triples with IEMOCAP-like shares."""
  if n_speakers < 1:
    raise ValueError(f"n_speakers must be positive, got {n_speakers}")
  exact = np.array(_CLASS_SHARES) * n_utterances
  counts = np.floor(exact).astype(int)
  # Largest remainder, so the counts sum to n_utterances.
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: n_utterances - counts.sum()]] += 1
  if counts.min() < n_speakers:
    raise ValueError(
      f"{n_utterances} utterances are too few for every one of {n_speakers} "
      "speakers to have every class"
    )
  # Class blocks dealt round-robin: each speaker gets every class, shares within one.
  flat = np.repeat(np.arange(len(DEMO_CLASSES)), counts)
  rng = np.random.default_rng([seed, n_utterances, n_speakers])
  triples = []
  for spk in range(n_speakers):
    own = rng.permutation(flat[spk::n_speakers])
    triples += [(spk, i, DEMO_CLASSES[c]) for i, c in enumerate(own)]
  return triples


def _make_speakers(n_speakers: int, seed: int) -> list[_Speaker]:
  rng = np.random.default_rng([seed, 1 << 20, n_speakers])
  speakers = []
  for spk in range(n_speakers):
    female = spk % 2 == 1
    speakers.append(
      _Speaker(
        f0=(210.0 if female else 115.0) * 2 ** (rng.normal(0.0, 1.5) / 12),
        tract_scale=(1.16 if female else 1.0) * np.exp(rng.normal(0.0, 0.04)),
        gain_db=rng.normal(0.0, 2.0),
        tilt_scale=np.exp(rng.normal(0.0, 0.15)),
        jitter=rng.uniform(0.005, 0.015),
      )
    )
  return speakers


def _synthesize(rng: np.random.Generator, speaker: _Speaker, mean: _Prosody, sr: int) -> np.ndarray:
  """One utterance: prosody drawn around the class means, then source-filter synthesis."""
  from scipy import signal  # Here: it takes seconds to import, and only synthesis needs it.

  n = int(rng.uniform(_MIN_SECONDS, _MAX_SECONDS) * sr)
  pitch_st = mean.pitch_st + rng.normal(0.0, 1.2)
  range_st = mean.range_st * np.exp(rng.normal(0.0, 0.35))
  gain_db = mean.gain_db + rng.normal(0.0, 2.0)
  rate = mean.rate * np.exp(rng.normal(0.0, 0.15))
  tilt_hz = mean.tilt_hz * speaker.tilt_scale * np.exp(rng.normal(0.0, 0.2))
  pause_s = mean.pause_s * np.exp(rng.normal(0.0, 0.35))
  attack_s = mean.attack_s * np.exp(rng.normal(0.0, 0.35))

  # Syllable layout: onset times and lengths until the clip is filled.
  starts, lengths = [], []
  t = rng.uniform(0.05, 0.2) * sr
  end = n - rng.uniform(0.05, 0.15) * sr
  while True:
    length = sr / rate * np.exp(rng.normal(0.0, 0.25))
    if t + length > end:
      break
    starts.append(int(t))
    lengths.append(int(length))
    t += length + rng.exponential(pause_s) * sr
  if not starts:
    starts, lengths = [int(t)], [int(end - t)]
  starts, lengths = np.array(starts), np.array(lengths)
  n_syl = len(starts)

  # F0 contour: anchors at syllable centres (accents plus declination), linearly joined.
  centres = starts + lengths / 2
  semitones = pitch_st + rng.normal(0.0, range_st, n_syl) - rng.uniform(0.5, 2.5) * centres / n
  time = np.arange(n)
  f0 = speaker.f0 * 2 ** (np.interp(time, centres, semitones) / 12)
  wobble = signal.lfilter([0.02], [1.0, -0.98], rng.normal(0.0, 1.0, n))
  f0 *= np.exp(speaker.jitter * wobble / wobble.std())

  # Glottal pulses where the phase wraps, split between neighbouring samples.
  phase = np.cumsum(f0 / sr)
  cycle = np.floor(phase)
  at = np.nonzero(np.diff(cycle))[0] + 1
  frac = (phase[at] - cycle[at]) / (f0[at] / sr)
  shimmer = np.exp(rng.normal(0.0, 0.08, len(at)))
  pulses = np.zeros(n + 1)
  np.add.at(pulses, at - 1, shimmer * frac)
  np.add.at(pulses, at, shimmer * (1 - frac))
  # Two real poles give the glottal -12 dB/octave roll-off above `tilt_hz`.
  pole = np.exp(-2 * np.pi * tilt_hz / sr)
  source = signal.lfilter([1.0], np.convolve([1.0, -pole], [1.0, -pole]), pulses)[:n]
  source /= np.abs(source).max()

  speech = np.zeros(n)
  ring = int(0.03 * sr)
  vowels = _VOWELS[rng.integers(0, len(_VOWELS), n_syl)]
  for start, length, formants in zip(starts, lengths, vowels, strict=True):
    seg = source[start : start + length] * _envelope(length, attack_s * sr, rng)
    seg = np.concatenate([seg, np.zeros(ring)])
    freqs = np.concatenate([formants, _UPPER_FORMANTS])
    freqs = freqs * speaker.tract_scale * np.exp(rng.normal(0.0, 0.06, len(freqs)))
    freqs = np.minimum(freqs, 0.45 * sr)
    denom = np.ones(1)
    for freq, bw in zip(freqs, _BANDWIDTHS, strict=True):
      r = np.exp(-np.pi * bw / sr)
      denom = np.convolve(denom, [1.0, -2 * r * np.cos(2 * np.pi * freq / sr), r * r])
    voiced = signal.lfilter([denom.sum()], denom, seg)
    stop = min(start + len(voiced), n)
    speech[start:stop] += voiced[: stop - start]
    if rng.random() < 0.5:
      _add_fricative(speech, start, rng, speaker, sr)

  # Lip radiation (+6 dB/octave).
  speech = np.diff(speech, prepend=0.0)
  active = np.abs(speech) > 1e-3 * np.abs(speech).max()
  rms = np.sqrt(np.mean(speech[active] ** 2))
  level_db = -30.0 + speaker.gain_db + gain_db
  speech *= 10 ** (level_db / 20) / rms
  noise = signal.lfilter([1.0], [1.0, -0.7], rng.normal(0.0, 1.0, n))
  noise *= 10 ** (rng.uniform(-62.0, -50.0) / 20) / noise.std()
  audio = speech + noise
  peak = np.abs(audio).max()
  if peak > 0.95:
    audio *= 0.95 / peak
  return audio.astype(np.float32)


def _envelope(length: int, attack: float, rng: np.random.Generator) -> np.ndarray:
  """Syllable amplitude: raised-cosine attack, slow sag, raised-cosine release."""
  attack = int(np.clip(attack, 16, length // 3))
  release = int(np.clip(rng.uniform(0.15, 0.3) * length, 16, length - attack))
  env = np.linspace(1.0, rng.uniform(0.6, 0.9), length)
  env[:attack] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
  env[length - release :] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(release) / release)
  return env


def _add_fricative(
  speech: np.ndarray,
  onset: int,
  rng: np.random.Generator,
  speaker: _Speaker,
  sr: int,
) -> None:
  """Adds an unvoiced noise burst ending at a syllable onset (a consonant)."""
  from scipy import signal

  length = int(rng.uniform(0.03, 0.08) * sr)
  start = max(onset - length, 0)
  length = onset - start
  if length < 16:
    return
  low = min(rng.uniform(2000.0, 3500.0) * speaker.tract_scale, 0.2 * sr)
  high = min(low * 2, 0.45 * sr)
  sos = signal.butter(2, (low, high), btype="bandpass", fs=sr, output="sos")
  burst = signal.sosfilt(sos, rng.normal(0.0, 1.0, length)) * np.hanning(length)
  speech[start:onset] += 0.05 * burst
