"""Reading audio files: mono, resampled, finite, or an `AudioError` that says why not."""

from __future__ import annotations

import os

import numpy as np
import soundfile
import soxr


class AudioError(ValueError):
  """An audio file that cannot be used; the message is the reason recorded in skipped.csv."""


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
  """Returns the file as float32 mono at `sample_rate` Hz, shape [n_samples]."""
  path = os.fspath(path)
  try:
    size = os.path.getsize(path)
  except OSError as error:
    raise AudioError(f"cannot open: {error.strerror or error}") from error
  if size == 0:
    raise AudioError("empty file (0 bytes)")
  try:
    waveform, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
  except Exception as error:  # soundfile raises several types for corrupt files.
    raise AudioError(f"unreadable audio ({type(error).__name__}: {error})") from error
  return prepare_waveform(waveform, file_rate, sample_rate)


def prepare_waveform(waveform: np.ndarray, file_rate: int, sample_rate: int) -> np.ndarray:
  """Mixes [n_samples, n_channels] (or [n_samples]) to mono and resamples to `sample_rate`."""
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim == 2:
    # librosa.to_mono averages channels; doing the same keeps features identical to librosa.
    waveform = waveform.mean(axis=1)
  if waveform.size == 0:
    raise AudioError("no audio samples")
  if not np.all(np.isfinite(waveform)):
    raise AudioError("non-finite samples (NaN or inf)")
  if file_rate != sample_rate:
    # soxr 'HQ' is librosa's default resampler (res_type='soxr_hq').
    waveform = soxr.resample(waveform, file_rate, sample_rate, quality="HQ").astype(np.float32)
  return waveform
