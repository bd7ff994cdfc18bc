"""Reading audio files: mono, resampled, finite, or an `AudioError` that says why not."""

from __future__ import annotations

import os
import re

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
    with soundfile.SoundFile(os.fsencode(path)) as audio:  # Bytes: any name the OS allows.
      _check_complete(audio.extra_info)
      waveform = audio.read(dtype="float32", always_2d=True)
      file_rate = audio.samplerate
  except AudioError:
    raise
  except Exception as error:  # soundfile raises several types for corrupt files.
    raise AudioError(f"unreadable audio ({type(error).__name__}: {error})") from error
  return prepare_waveform(waveform, file_rate, sample_rate)


# libsndfile's log of a WAV-family header whose data chunk runs past the end of the file.
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Sizes a writer that streams leaves in the header in place of the real one.
_STREAMED_SIZES = (0, 0x7FFFFFFF, 0xFFFFFFFF)


def _check_complete(header_log: str) -> None:
  """Refuses a file cut short (an interrupted copy or download), which libsndfile would
  read as far as it goes: its header declares more audio than the file holds."""
  if (match := _DATA_SIZE.search(header_log)) is None:
    return
  declared, present = int(match[1]), int(match[2])
  if declared > present and declared not in _STREAMED_SIZES:
    raise AudioError(
      f"truncated: its header declares {declared} bytes of audio, the file holds {present}"
    )


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
