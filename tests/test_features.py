"""Features and audio loading match an independent reference pipeline; bad audio is rejected.

The reference is computed here from its definition, in float64: a numpy STFT (periodic Hann
window, frames centred by zero-padding n_fft // 2 at both ends, librosa's center=True with
pad_mode='constant'), librosa's mel filter bank, power_to_db as 10 log10(max(S, amin)) with an
absolute reference and an 80 dB floor below the peak, and MFCCs as scipy's orthonormal DCT-II.
"""

from __future__ import annotations

import os
import pathlib

import librosa
import numpy as np
import pytest
import scipy.fft
import soundfile as sf

from ser_jax import audio
from ser_jax.features import FeatureParams, compute_features

SR = 22050
MAX_SAMPLES = 6 * SR  # 132300
N_FRAMES = 259  # 1 + 132300 // 512
# float32 features against the float64 reference. Log-mel values (|x| <= 100 dB) round by
# ~1e-5 dB in float32 (seen: 7e-6); MFCC c0 sums 128 of them (|c0| up to ~1000), where one
# float32 step is 6e-5 (seen: 6e-5).
ATOL_DB = 1e-4
ATOL_MFCC = 1e-3


def _signal(n_samples: int, seed: int = 0, sr: int = SR) -> np.ndarray:
  """A voiced-ish test signal: two harmonics with a slow envelope plus a little noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(n_samples) / sr
  envelope = 0.5 + 0.4 * np.sin(2 * np.pi * 1.3 * t)
  tone = np.sin(2 * np.pi * 220 * t) + 0.4 * np.sin(2 * np.pi * 660 * t + 0.3)
  x = 0.3 * envelope * tone + 0.02 * rng.standard_normal(n_samples)
  return x.astype(np.float32)


def _power_spectrogram(
  clip: np.ndarray, n_fft: int = 2048, hop_length: int = 512, pad_mode: str = "constant"
) -> np.ndarray:
  """|STFT|^2 [1 + n_fft // 2, 1 + len(clip) // hop_length] of centred, Hann-windowed frames."""
  padded = np.pad(np.asarray(clip, np.float64), n_fft // 2, mode=pad_mode)
  frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # Periodic, as for FFTs.
  return (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).T


def _power_to_db(power: np.ndarray, amin: float = 1e-10, top_db: float = 80.0) -> np.ndarray:
  """Decibels re 1 (absolute), floored at `top_db` below the clip's peak."""
  db = 10.0 * np.log10(np.maximum(power, amin))
  return np.maximum(db, db.max() - top_db)


def _reference_logmel(
  clip: np.ndarray, n_mels: int = 128, hop_length: int = 512, pad_mode: str = "constant"
) -> np.ndarray:
  power = _power_spectrogram(clip, hop_length=hop_length, pad_mode=pad_mode)
  mel_basis = librosa.filters.mel(sr=SR, n_fft=2048, n_mels=n_mels, dtype=np.float64)
  return _power_to_db(mel_basis @ power)


def _reference_mfcc(clip: np.ndarray, n_mfcc: int = 40) -> np.ndarray:
  return scipy.fft.dct(_reference_logmel(clip), type=2, norm="ortho", axis=0)[:n_mfcc]


def _pad_or_clip(x: np.ndarray, n: int) -> np.ndarray:
  out = np.zeros(n, dtype=np.float32)
  out[: min(n, len(x))] = x[:n]
  return out


# --- compute_features against the reference ------------------------------------------


@pytest.mark.parametrize("n_samples", [4 * SR + 123, MAX_SAMPLES, 7 * SR])
def test_logmel_equals_reference_mel_power_in_db(n_samples):
  """Log-mel = 10 log10 of mel-filtered |STFT|^2, re 1, floored 80 dB below the peak."""
  x = _signal(n_samples)
  got = compute_features(x, FeatureParams(kind="logmel"))
  want = _reference_logmel(_pad_or_clip(x, MAX_SAMPLES))
  assert got.shape == (128, N_FRAMES)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_DB)


@pytest.mark.parametrize("n_samples", [4 * SR + 123, MAX_SAMPLES, 7 * SR])
def test_mfcc_equals_orthonormal_dct_of_the_reference_logmel(n_samples):
  x = _signal(n_samples, seed=1)
  got = compute_features(x, FeatureParams(kind="mfcc"))
  want = _reference_mfcc(_pad_or_clip(x, MAX_SAMPLES))
  assert got.shape == (40, N_FRAMES)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_MFCC)


def test_first_and_last_frames_are_centred_on_zero_padding():
  """The edge frames see zeros beyond the clip, not a reflection of it (librosa < 0.10)."""
  x = _signal(MAX_SAMPLES, seed=9)
  got = compute_features(x, FeatureParams(kind="logmel"))
  reflected = _reference_logmel(x, pad_mode="reflect")
  # The comparisons above would catch the other convention: it moves the edge frames by
  # decibels, and leaves the inner frames alone.
  for edge in (0, -1):
    assert np.max(np.abs(got[:, edge] - reflected[:, edge])) > 1.0
  np.testing.assert_allclose(got[:, 4:-4], reflected[:, 4:-4], rtol=0, atol=ATOL_DB)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_six_second_clip_gives_259_frames(kind):
  params = FeatureParams(kind=kind)
  assert params.max_samples == MAX_SAMPLES
  assert params.n_frames == N_FRAMES
  assert compute_features(_signal(MAX_SAMPLES), params).shape == (params.n_bins, N_FRAMES)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_long_clip_is_clipped_to_its_first_max_seconds(kind):
  params = FeatureParams(kind=kind)
  x = _signal(9 * SR, seed=2)
  np.testing.assert_array_equal(
    compute_features(x, params), compute_features(x[:MAX_SAMPLES].copy(), params)
  )
  # The tail matters only if it were kept: a different tail gives the same features.
  y = x.copy()
  y[MAX_SAMPLES:] = _signal(3 * SR, seed=3)
  np.testing.assert_array_equal(compute_features(x, params), compute_features(y, params))


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_short_clip_is_zero_padded_at_the_end(kind):
  params = FeatureParams(kind=kind)
  x = _signal(2 * SR + 7, seed=4)
  padded = np.concatenate([x, np.zeros(MAX_SAMPLES - len(x), np.float32)])
  np.testing.assert_array_equal(compute_features(x, params), compute_features(padded, params))


def test_max_seconds_and_other_parameters_are_honoured():
  params = FeatureParams(kind="logmel", max_seconds=1.0, n_mels=64, hop_length=256)
  x = _signal(SR + 500, seed=5)
  want = _reference_logmel(x[:SR], n_mels=64, hop_length=256)
  got = compute_features(x, params)
  assert got.shape == (64, 1 + SR // 256) == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_DB)


@pytest.mark.filterwarnings("ignore:n_fft=2048 is too large")
@pytest.mark.parametrize("n_samples", [1, 100, 511, 512, 513, SR, MAX_SAMPLES - 1, MAX_SAMPLES])
def test_valid_frames_is_librosas_frame_count_of_the_unpadded_clip(n_samples):
  params = FeatureParams(kind="logmel")
  frames = librosa.feature.melspectrogram(
    y=np.ones(n_samples, np.float32), sr=SR, n_fft=2048, hop_length=512
  ).shape[1]
  assert params.valid_frames(n_samples) == frames == _power_spectrogram(np.ones(n_samples)).shape[1]


@pytest.mark.parametrize("n_samples", [MAX_SAMPLES, MAX_SAMPLES + 1, 10 * SR])
def test_valid_frames_is_capped_at_the_padded_length(n_samples):
  assert FeatureParams().valid_frames(n_samples) == N_FRAMES


# --- load_audio against librosa.load ---------------------------------------------------


def _write(path: pathlib.Path, data: np.ndarray, sr: int, subtype: str) -> pathlib.Path:
  sf.write(path, data, sr, subtype=subtype, format="WAV")
  return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # librosa.load imports audioread.
@pytest.mark.parametrize(
  ("file_rate", "channels", "subtype"),
  [(16000, 2, "PCM_16"), (48000, 1, "PCM_24")],
  ids=["16k-stereo-pcm16", "48k-mono-pcm24"],
)
def test_load_audio_equals_librosa_load(tmp_path, file_rate, channels, subtype):
  n = int(1.5 * file_rate)
  x = _signal(n, seed=6, sr=file_rate)
  data = np.stack([x, 0.5 * x[::-1]], axis=1) if channels == 2 else x
  path = _write(tmp_path / "clip.wav", data, file_rate, subtype)

  got = audio.load_audio(path, SR)
  want, _ = librosa.load(path, sr=SR)
  assert got.dtype == np.float32
  assert got.ndim == 1
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

  # The whole pipeline: load + features equals librosa's load + the reference features.
  for kind, reference, atol in (
    ("logmel", _reference_logmel, ATOL_DB),
    ("mfcc", _reference_mfcc, ATOL_MFCC),
  ):
    features = compute_features(got, FeatureParams(kind=kind))
    np.testing.assert_allclose(
      features, reference(_pad_or_clip(want, MAX_SAMPLES)), rtol=0, atol=atol
    )


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
@pytest.mark.parametrize("file_rate", [8000, 16000, 44100, 48000])
def test_wav_formats_load_to_float32_mono_at_target_rate(tmp_path, subtype, file_rate):
  seconds = 0.25
  n = int(seconds * file_rate)
  t = np.arange(n) / file_rate
  x = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
  path = _write(tmp_path / "clip.wav", x, file_rate, subtype)

  y = audio.load_audio(path, SR)
  assert y.dtype == np.float32
  assert y.ndim == 1
  assert abs(len(y) - n * SR / file_rate) <= 1
  # The content survives: a 300 Hz sine of amplitude 0.5, resampled to the target rate.
  want = 0.5 * np.sin(2 * np.pi * 300 * np.arange(len(y)) / SR)
  middle = slice(len(y) // 4, 3 * len(y) // 4)  # Away from resampler edge effects.
  quantisation = 2.0 / 256 if subtype == "PCM_U8" else 1e-3
  np.testing.assert_allclose(y[middle], want[middle], rtol=0, atol=quantisation + 2e-3)


def test_load_audio_at_the_target_rate_does_not_resample(tmp_path):
  x = _signal(SR // 2, seed=7)
  path = _write(tmp_path / "clip.wav", x, SR, "FLOAT")
  np.testing.assert_array_equal(audio.load_audio(path, SR), x)


# --- bad audio -------------------------------------------------------------------------


def _valid_wav_bytes(tmp_path: pathlib.Path) -> bytes:
  path = _write(tmp_path / "valid.wav", _signal(4000, sr=16000), 16000, "PCM_16")
  return path.read_bytes()


def test_zero_byte_file_is_an_audio_error(tmp_path):
  path = tmp_path / "empty.wav"
  path.write_bytes(b"")
  with pytest.raises(audio.AudioError, match=r"empty file \(0 bytes\)"):
    audio.load_audio(path, SR)


def test_missing_file_is_an_audio_error(tmp_path):
  with pytest.raises(audio.AudioError, match="cannot open"):
    audio.load_audio(tmp_path / "absent.wav", SR)


def test_non_audio_bytes_named_wav_is_an_audio_error(tmp_path):
  path = tmp_path / "notes.wav"
  path.write_bytes(b"this is a text file, not RIFF audio\n" * 20)
  with pytest.raises(audio.AudioError, match="unreadable audio"):
    audio.load_audio(path, SR)


def test_truncated_header_is_an_audio_error(tmp_path):
  path = tmp_path / "truncated.wav"
  path.write_bytes(_valid_wav_bytes(tmp_path)[:20])
  with pytest.raises(audio.AudioError, match="unreadable audio"):
    audio.load_audio(path, SR)


def test_a_wav_of_no_samples_is_an_audio_error(tmp_path):
  path = _write(tmp_path / "no_samples.wav", np.zeros(0, np.float32), 16000, "PCM_16")
  with pytest.raises(audio.AudioError, match="no audio samples"):
    audio.load_audio(path, SR)


@pytest.mark.parametrize("kept_bytes", [44, 100, 4044])
def test_a_wav_cut_short_is_an_audio_error(tmp_path, kept_bytes):
  """An interrupted copy: the header declares 8000 bytes of samples, fewer follow it."""
  path = tmp_path / "cut.wav"
  path.write_bytes(_valid_wav_bytes(tmp_path)[:kept_bytes])
  with pytest.raises(
    audio.AudioError,
    match=rf"truncated: its header declares 8000 bytes of audio, the file holds {kept_bytes - 44}",
  ):
    audio.load_audio(path, SR)


def test_a_streamed_wav_whose_header_gives_no_size_is_read(tmp_path):
  """Writers to a pipe leave 0xFFFFFFFF as the data size; every sample is still there."""
  wav = bytearray(_valid_wav_bytes(tmp_path))
  assert wav[36:40] == b"data"
  wav[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
  path = tmp_path / "streamed.wav"
  path.write_bytes(bytes(wav))
  expected = audio.load_audio(
    _write(tmp_path / "whole.wav", _signal(4000, sr=16000), 16000, "PCM_16"), SR
  )
  np.testing.assert_array_equal(audio.load_audio(path, SR), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_an_audio_error(tmp_path, bad):
  x = _signal(8000, sr=16000)
  x[1234] = bad
  path = _write(tmp_path / "nonfinite.wav", x, 16000, "FLOAT")
  with pytest.raises(audio.AudioError, match=r"non-finite samples \(NaN or inf\)"):
    audio.load_audio(path, SR)


def test_audio_error_is_a_value_error():
  assert issubclass(audio.AudioError, ValueError)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_silence_gives_finite_features(tmp_path, kind):
  path = _write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000, "PCM_16")
  y = audio.load_audio(path, SR)
  assert np.all(y == 0)
  features = compute_features(y, FeatureParams(kind=kind))
  assert features.shape == (FeatureParams(kind=kind).n_bins, N_FRAMES)
  assert np.all(np.isfinite(features))
  if kind == "logmel":
    # Absolute reference: silence sits at librosa's amin floor, 10 * log10(1e-10) dB.
    np.testing.assert_allclose(features, -100.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_clip_shorter_than_one_frame_gives_finite_features(tmp_path, kind):
  path = _write(tmp_path / "blip.wav", _signal(100, seed=8), SR, "FLOAT")
  y = audio.load_audio(path, SR)
  assert len(y) == 100
  params = FeatureParams(kind=kind)
  features = compute_features(y, params)
  assert features.shape == (params.n_bins, N_FRAMES)
  assert np.all(np.isfinite(features))
  reference = _reference_logmel if kind == "logmel" else _reference_mfcc
  atol = ATOL_DB if kind == "logmel" else ATOL_MFCC
  np.testing.assert_allclose(features, reference(_pad_or_clip(y, MAX_SAMPLES)), atol=atol)
  assert params.valid_frames(len(y)) == 1


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
  x = _signal(4000, sr=16000)
  plain = _write(tmp_path / "plain.wav", x, 16000, "PCM_16")
  odd = tmp_path / os.fsdecode(b"caf\xe9.wav")  # Latin-1 bytes, as an old archive may hold.
  odd.write_bytes(plain.read_bytes())
  np.testing.assert_array_equal(audio.load_audio(odd, SR), audio.load_audio(plain, SR))
