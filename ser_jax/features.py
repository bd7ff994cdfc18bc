"""Log-mel and MFCC features exactly as the paper computes them with librosa.

dB reference: `ref=1.0` (absolute), librosa's default, with `top_db=80`. An absolute
reference keeps each clip's loudness, an emotion cue that a per-clip `ref=np.max` would
remove; `top_db=80` floors each clip at 80 dB below its own peak, so zero padding and
silence map to a finite floor instead of -100 dB.
"""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np

TOP_DB = 80.0


@dataclasses.dataclass(frozen=True)
class FeatureParams:
  """Everything that determines a clip's features."""

  kind: str = "mfcc"  # 'logmel' or 'mfcc'
  sample_rate: int = 22050
  max_seconds: float = 6.0
  n_fft: int = 2048
  win_length: int = 2048
  hop_length: int = 512
  n_mels: int = 128
  n_mfcc: int = 40

  @classmethod
  def from_config(cls, features_config) -> FeatureParams:
    return cls(**{f.name: features_config[f.name] for f in dataclasses.fields(cls)})

  @property
  def max_samples(self) -> int:
    return int(round(self.max_seconds * self.sample_rate))

  @property
  def n_bins(self) -> int:
    return self.n_mels if self.kind == "logmel" else self.n_mfcc

  @property
  def n_frames(self) -> int:
    # librosa centres frames (center=True), so a clip of n samples has 1 + n // hop frames.
    return 1 + self.max_samples // self.hop_length

  def valid_frames(self, n_samples: int) -> int:
    """Frames that see audio rather than only end padding."""
    return min(self.n_frames, 1 + min(n_samples, self.max_samples) // self.hop_length)


def fix_length(waveform: np.ndarray, params: FeatureParams) -> np.ndarray:
  """Keeps the first `max_seconds` and zero-pads shorter clips at the end."""
  return librosa.util.fix_length(waveform[: params.max_samples], size=params.max_samples)


def compute_features(waveform: np.ndarray, params: FeatureParams) -> np.ndarray:
  """Features of a mono waveform at `params.sample_rate`, shape [n_bins, n_frames], float32."""
  clip = fix_length(np.asarray(waveform, dtype=np.float32), params)
  mel_power = librosa.feature.melspectrogram(
    y=clip,
    sr=params.sample_rate,
    n_fft=params.n_fft,
    hop_length=params.hop_length,
    win_length=params.win_length,
    window="hann",
    center=True,
    power=2.0,
    n_mels=params.n_mels,
  )
  log_mel = librosa.power_to_db(mel_power, ref=1.0, top_db=TOP_DB)
  if params.kind == "logmel":
    return log_mel.astype(np.float32)
  # librosa.feature.mfcc takes the first n_mfcc DCT-II (ortho) coefficients of the log-mel.
  return librosa.feature.mfcc(S=log_mel, n_mfcc=params.n_mfcc, dct_type=2, norm="ortho").astype(
    np.float32
  )
