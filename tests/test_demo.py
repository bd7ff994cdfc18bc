"""Tests for the synthetic demo corpus."""

from __future__ import annotations

import collections
import csv
import json
import pathlib

import librosa
import numpy as np
import pytest
import soundfile as sf

from ser_jax import run_data
from ser_jax.config import default_config
from ser_jax.data.demo import DEMO_CLASSES, is_demo_corpus, write_demo_corpus

_SHARES = {"neutral": 0.48, "happiness": 0.12, "sadness": 0.27, "anger": 0.13}
_N_SPEAKERS = 8


def _read_manifest(root: pathlib.Path) -> list[dict[str, str]]:
  with open(root / "manifest.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  return write_demo_corpus(
    tmp_path_factory.mktemp("demo") / "corpus", n_utterances=240, n_speakers=_N_SPEAKERS
  )


def test_layout(corpus: pathlib.Path) -> None:
  with open(corpus / "manifest.csv") as f:
    assert f.readline() == "utt_id,path,label,speaker,group\n"
  rows = _read_manifest(corpus)
  assert len(rows) == 240
  assert [r["utt_id"] for r in rows] == sorted(r["utt_id"] for r in rows)
  for r in rows:
    assert r["path"] == f"wav/{r['utt_id']}.wav"
    assert r["utt_id"].startswith(r["speaker"] + "_")
    assert r["group"] == r["speaker"]
    assert r["label"] in DEMO_CLASSES
  assert sorted(p.name for p in (corpus / "wav").iterdir()) == sorted(
    f"{r['utt_id']}.wav" for r in rows
  )
  params = json.loads((corpus / "demo.json").read_text())
  assert params["n_utterances"] == 240
  assert params["seed"] == 0


def test_class_shares_and_speakers(corpus: pathlib.Path) -> None:
  rows = _read_manifest(corpus)
  counts = collections.Counter(r["label"] for r in rows)
  for label, share in _SHARES.items():
    assert abs(counts[label] / len(rows) - share) <= 0.03, counts
  by_speaker = collections.defaultdict(set)
  for r in rows:
    by_speaker[r["speaker"]].add(r["label"])
  assert len(by_speaker) == _N_SPEAKERS
  for labels in by_speaker.values():
    assert labels == set(DEMO_CLASSES)


def test_audio_is_valid(corpus: pathlib.Path) -> None:
  for r in _read_manifest(corpus):
    info = sf.info(corpus / r["path"])
    assert info.samplerate == 16000
    assert info.channels == 1
    assert info.subtype == "PCM_16"
    assert 1.5 <= info.duration <= 3.5
    audio, _ = sf.read(corpus / r["path"], dtype="float32")
    assert np.isfinite(audio).all()
    peak = np.abs(audio).max()
    assert 0.01 < peak < 1.0, r["utt_id"]


def test_deterministic(tmp_path: pathlib.Path) -> None:
  a = write_demo_corpus(tmp_path / "a", n_utterances=64, n_speakers=4, seed=3)
  b = write_demo_corpus(tmp_path / "b", n_utterances=64, n_speakers=4, seed=3)
  c = write_demo_corpus(tmp_path / "c", n_utterances=64, n_speakers=4, seed=4)
  manifest = (a / "manifest.csv").read_bytes()
  assert manifest == (b / "manifest.csv").read_bytes()
  rows = _read_manifest(a)
  for r in rows[:: len(rows) // 5]:
    assert (a / r["path"]).read_bytes() == (b / r["path"]).read_bytes()
    assert (a / r["path"]).read_bytes() != (c / r["path"]).read_bytes()


def test_idempotent_and_rebuilds_on_change(tmp_path: pathlib.Path) -> None:
  root = tmp_path / "demo"
  assert write_demo_corpus(root, n_utterances=64, n_speakers=4) == root
  wav = root / _read_manifest(root)[0]["path"]
  stamps = (wav.stat().st_mtime_ns, (root / "manifest.csv").stat().st_mtime_ns)
  write_demo_corpus(root, n_utterances=64, n_speakers=4)
  assert (wav.stat().st_mtime_ns, (root / "manifest.csv").stat().st_mtime_ns) == stamps

  write_demo_corpus(root, n_utterances=72, n_speakers=4)
  assert len(_read_manifest(root)) == 72
  assert json.loads((root / "demo.json").read_text())["n_utterances"] == 72
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_incomplete_root_is_rebuilt(tmp_path: pathlib.Path) -> None:
  root = tmp_path / "demo"
  (root / "wav").mkdir(parents=True)
  (root / "wav" / "stale.wav").write_bytes(b"partial")
  write_demo_corpus(root, n_utterances=64, n_speakers=4)
  assert not (root / "wav" / "stale.wav").exists()
  assert len(_read_manifest(root)) == 64
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_too_few_utterances_rejected(tmp_path: pathlib.Path) -> None:
  with pytest.raises(ValueError, match="every class"):
    write_demo_corpus(tmp_path / "demo", n_utterances=20, n_speakers=8)
  assert not list(tmp_path.iterdir())


def test_learnable_but_not_trivial(corpus: pathlib.Path) -> None:
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import balanced_accuracy_score
  from sklearn.model_selection import GroupKFold, cross_val_predict
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  rows = _read_manifest(corpus)
  features = []
  for r in rows:
    audio, sr = sf.read(corpus / r["path"], dtype="float32")
    mfcc = librosa.feature.mfcc(y=audio, sr=sr, n_mfcc=20)
    features.append(np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]))
  labels = [DEMO_CLASSES.index(r["label"]) for r in rows]
  model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  predicted = cross_val_predict(
    model,
    np.stack(features),
    labels,
    groups=[r["speaker"] for r in rows],
    cv=GroupKFold(n_splits=4),
  )
  ua = balanced_accuracy_score(labels, predicted)
  print(f"speaker-grouped 4-fold MFCC logistic regression UA: {ua:.3f}")
  assert 0.45 < ua < 0.97


def test_a_demo_corpus_of_another_size_at_data_root_is_read_as_it_is(tmp_path):
  root = write_demo_corpus(tmp_path / "big", n_utterances=40, n_speakers=4, seed=1)
  assert is_demo_corpus(root) and not is_demo_corpus(tmp_path)
  config = default_config()
  config.data.corpus = "demo"
  config.data.root = str(root)
  config.data.cache_dir = str(tmp_path / "cache")
  corpus = run_data.load_corpus(config)
  assert len(corpus.utterances) == 40  # Not replaced by the default 320-clip corpus.
