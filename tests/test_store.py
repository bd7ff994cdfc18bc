"""The feature store: correct rows, reuse, skipped files, crash safety and worker parity."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import threadpoolctl
from helpers import REPO, TEST_ENV

from ser_jax import audio, io_utils, store
from ser_jax.data.corpus import Corpus, CorpusError, Utterance
from ser_jax.features import FeatureParams, compute_features

CLASSES = ("neutral", "happiness", "sadness", "anger")
PARAMS = FeatureParams(kind="mfcc", max_seconds=1.0)
STORE_FILES = ("features.npy", "labels.npy", "valid_frames.npy", "manifest.csv", "skipped.csv")


def _write_corpus(root: pathlib.Path, n: int = 12, corrupt: tuple[int, ...] = ()) -> Corpus:
  """`n` short wavs (0.3-1.4 s, 16 kHz), two speakers, four classes; `corrupt` ones are junk."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  utterances = []
  for i in range(n):
    speaker = f"spk{i % 2}"
    label = CLASSES[i % len(CLASSES)]
    path = root / f"{speaker}_{i:03d}.wav"
    n_samples = int(16000 * (0.3 + 0.1 * i))
    t = np.arange(n_samples) / 16000
    x = 0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.01 * rng.standard_normal(n_samples)
    if i in corrupt:
      path.write_bytes(b"not a RIFF file " * 8)
    else:
      sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")
    utterances.append(Utterance(f"{speaker}_{i:03d}", str(path), label, speaker, speaker))
  utterances.sort(key=lambda u: u.utt_id)
  return Corpus(name="tiny", class_names=CLASSES, utterances=tuple(utterances))


def _build(corpus, cache_dir, **kwargs) -> pathlib.Path:
  kwargs.setdefault("num_workers", 1)
  return store.build_store(corpus, PARAMS, cache_dir, progress=False, **kwargs)


def _bytes(path: pathlib.Path) -> dict[str, bytes]:
  return {name: (path / name).read_bytes() for name in STORE_FILES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
  return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_build(corpus, tmp_path_factory) -> pathlib.Path:
  """An uninterrupted single-process build to compare other builds against."""
  return _build(corpus, tmp_path_factory.mktemp("cache"))


def test_store_rows_equal_features_of_each_loaded_file(corpus, reference_build):
  opened = store.open_store(reference_build)
  assert len(opened) == len(corpus.utterances) == 12
  assert opened.features.shape == (12, 40, 1 + 22050 // 512)
  assert opened.features.dtype == np.float32
  for i, u in enumerate(corpus.utterances):
    waveform = audio.load_audio(u.path, PARAMS.sample_rate)
    # The store computes with one BLAS thread (so its bytes do not depend on the worker
    # count); with the same setting the rows are bit-identical.
    with threadpoolctl.threadpool_limits(1):
      expected = compute_features(waveform, PARAMS)
    np.testing.assert_array_equal(opened.features[i], expected)
    # And with this process's default BLAS threads, equal up to summation order.
    np.testing.assert_allclose(opened.features[i], compute_features(waveform, PARAMS), atol=1e-3)
    assert opened.valid_frames[i] == PARAMS.valid_frames(len(waveform))
  np.testing.assert_array_equal(opened.labels, [CLASSES.index(u.label) for u in corpus.utterances])
  assert opened.labels.dtype == np.int32
  assert opened.valid_frames.dtype == np.int32
  # The 0.3 s clip sees audio in fewer frames than the 1.4 s one, which fills all 44.
  assert opened.valid_frames.min() < opened.valid_frames.max() == PARAMS.n_frames


def test_store_manifest_and_meta(corpus, reference_build):
  opened = store.open_store(reference_build)
  # A corpus without folds of its own has no splits column.
  assert [tuple(row.values()) for row in opened.manifest] == [
    dataclasses.astuple(u)[:5] for u in corpus.utterances
  ]
  assert list(opened.manifest[0]) == ["utt_id", "path", "label", "speaker", "group"]
  np.testing.assert_array_equal(opened.speakers, [u.speaker for u in corpus.utterances])
  np.testing.assert_array_equal(opened.groups, [u.group for u in corpus.utterances])
  meta = json.loads((reference_build / "meta.json").read_text())
  assert meta == opened.meta
  assert opened.class_names == CLASSES
  assert meta["corpus"] == "tiny"
  assert meta["n_clips"] == 12
  assert meta["n_skipped"] == 0
  assert meta["features"] == dataclasses.asdict(PARAMS)
  assert FeatureParams(**meta["features"]) == PARAMS
  assert meta["n_bins"] == 40
  assert meta["n_frames"] == 44
  assert {"numpy", "librosa", "soundfile", "soxr", "python"} <= set(meta["versions"])
  assert all(meta["versions"].values())
  with open(reference_build / "skipped.csv", newline="") as f:
    assert list(csv.reader(f)) == [["path", "reason"]]


def test_store_folder_is_named_after_corpus_kind_and_key(corpus, reference_build):
  assert reference_build.name == f"tiny-mfcc-{store.store_key(corpus, PARAMS)}"
  assert reference_build == store.store_path(corpus, PARAMS, reference_build.parent)
  assert not reference_build.with_name(reference_build.name + ".partial").exists()
  leftovers = {"raw_features.npy", "n_samples.npy", "skipped.jsonl"}
  assert not leftovers & {p.name for p in reference_build.iterdir()}


def test_second_build_reuses_the_store_without_rewriting(corpus, reference_build, monkeypatch):
  before = {p.name: p.stat().st_mtime_ns for p in reference_build.iterdir()}
  content = _bytes(reference_build)

  def fail(*args, **kwargs):
    raise AssertionError("a complete store must not be extracted again")

  monkeypatch.setattr(store, "_extract", fail)
  assert _build(corpus, reference_build.parent) == reference_build
  assert {p.name: p.stat().st_mtime_ns for p in reference_build.iterdir()} == before
  assert _bytes(reference_build) == content


def test_changed_feature_parameter_gives_a_new_store(corpus, reference_build):
  other = dataclasses.replace(PARAMS, n_mfcc=20)
  path = store.store_path(corpus, other, reference_build.parent)
  assert path != reference_build
  assert store.store_key(corpus, other) != store.store_key(corpus, PARAMS)
  for changed in (
    dataclasses.replace(PARAMS, kind="logmel"),
    dataclasses.replace(PARAMS, max_seconds=2.0),
    dataclasses.replace(PARAMS, hop_length=256),
  ):
    assert store.store_path(corpus, changed, reference_build.parent) != reference_build


def test_changed_parameter_builds_its_own_store(corpus, tmp_path):
  first = _build(corpus, tmp_path)
  other = dataclasses.replace(PARAMS, n_mfcc=20)
  second = store.build_store(corpus, other, tmp_path, num_workers=1, progress=False)
  assert second != first
  assert store.open_store(second).features.shape == (12, 20, 44)
  assert store.open_store(first).features.shape == (12, 40, 44)


def test_changed_listing_gives_a_new_key(corpus):
  fewer = dataclasses.replace(corpus, utterances=corpus.utterances[:-1])
  assert store.store_key(fewer, PARAMS) != store.store_key(corpus, PARAMS)


def test_a_file_replaced_by_one_of_the_same_size_gives_a_new_store(tmp_path):
  """The fix of a bad clip in place (same length, other samples) is read again."""
  corpus = _write_corpus(tmp_path / "corpus", corrupt=(5,))
  before = store.store_key(corpus, PARAMS)
  fixed = pathlib.Path(corpus.utterances[5].path)
  size, mtime = fixed.stat().st_size, fixed.stat().st_mtime_ns
  fixed.write_bytes(bytes(reversed(fixed.read_bytes())))
  os.utime(fixed, ns=(mtime + 10**9, mtime + 10**9))
  assert fixed.stat().st_size == size
  assert store.store_key(corpus, PARAMS) != before


def test_corrupt_file_is_skipped_with_a_reason_and_good_rows_stay_intact(tmp_path, reference_build):
  corpus = _write_corpus(tmp_path / "corpus", corrupt=(5,))
  bad = next(u for u in corpus.utterances if u.utt_id.endswith("_005"))
  path = _build(corpus, tmp_path / "cache")
  opened = store.open_store(path)
  assert len(opened) == 11
  assert [row["utt_id"] for row in opened.manifest] == [
    u.utt_id for u in corpus.utterances if u is not bad
  ]
  assert opened.meta["n_clips"] == 11
  assert opened.meta["n_skipped"] == 1
  with open(path / "skipped.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1
  assert rows[0]["path"] == bad.path
  assert rows[0]["reason"].startswith("unreadable audio")
  # The good files are the same audio as in the reference corpus: same rows, bit for bit.
  reference = store.open_store(reference_build)
  keep = [i for i, u in enumerate(reference.manifest) if not u["utt_id"].endswith("_005")]
  np.testing.assert_array_equal(opened.features, reference.features[keep])
  np.testing.assert_array_equal(opened.labels, reference.labels[keep])
  np.testing.assert_array_equal(opened.valid_frames, reference.valid_frames[keep])


def test_strict_build_raises_audio_error_naming_the_file(tmp_path):
  corpus = _write_corpus(tmp_path / "corpus", corrupt=(5,))
  bad = next(u for u in corpus.utterances if u.utt_id.endswith("_005"))
  with pytest.raises(audio.AudioError, match=rf"{bad.path}: unreadable audio"):
    _build(corpus, tmp_path / "cache", strict=True)
  final = store.store_path(corpus, PARAMS, tmp_path / "cache")
  assert not (final / "meta.json").exists()
  assert final.with_name(final.name + ".partial").is_dir()
  # Without strict the same cache finishes, skipping the file.
  assert len(store.open_store(_build(corpus, tmp_path / "cache"))) == 11


def test_corpus_whose_files_are_all_unreadable_is_an_error(tmp_path):
  corpus = _write_corpus(tmp_path / "corpus", n=3, corrupt=(0, 1, 2))
  with pytest.raises(CorpusError, match="no audio file of corpus 'tiny' could be read"):
    _build(corpus, tmp_path / "cache")


def test_empty_corpus_is_an_error(tmp_path):
  with pytest.raises(CorpusError, match="lists no utterances"):
    _build(Corpus("tiny", CLASSES, ()), tmp_path)


def test_open_store_refuses_an_incomplete_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a complete feature store"):
    store.open_store(tmp_path)


def test_crash_mid_extraction_leaves_no_store_and_resume_gives_identical_bytes(
  corpus, reference_build, tmp_path, monkeypatch
):
  monkeypatch.setattr(store, "_CHUNK", 2)  # Six chunks of two clips.
  real_chunk = store._extract_chunk
  calls = []

  def crash_after_three_chunks(raw_path, params, job):
    calls.append([index for index, _ in job])
    if len(calls) > 3:
      raise RuntimeError("simulated crash")
    return real_chunk(raw_path, params, job)

  monkeypatch.setattr(store, "_extract_chunk", crash_after_three_chunks)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _build(corpus, tmp_path)
  final = store.store_path(corpus, PARAMS, tmp_path)
  partial = final.with_name(final.name + ".partial")
  assert not final.exists()
  assert partial.is_dir()

  resumed = []

  def record(raw_path, params, job):
    resumed.extend(index for index, _ in job)
    return real_chunk(raw_path, params, job)

  monkeypatch.setattr(store, "_extract_chunk", record)
  assert _build(corpus, tmp_path) == final
  # Only the clips that had not finished are extracted again.
  assert sorted(resumed) == list(range(6, 12))
  assert not partial.exists()
  assert _bytes(final) == _bytes(reference_build)


# Builds a store in chunks of two clips and hangs once `hang_after` clips are extracted:
# mid-chunk, so that the killed process leaves a row written but not yet recorded as done.
_HANGING_BUILD = """
import json, pathlib, sys, time
from ser_jax import store
from ser_jax.data.corpus import Corpus, Utterance
from ser_jax.features import FeatureParams

spec = json.loads(sys.argv[1])
corpus = Corpus(
  spec["name"], tuple(spec["class_names"]), tuple(Utterance(*u) for u in spec["utterances"])
)
real_extract_one = store._extract_one
extracted = []

def extract_then_hang(raw, index, path, params):
  result = real_extract_one(raw, index, path, params)
  extracted.append(index)
  if len(extracted) == spec["hang_after"]:
    pathlib.Path(spec["marker"]).write_text(json.dumps(extracted))
    time.sleep(3600)
  return result

store._CHUNK = 2
store._extract_one = extract_then_hang
store.build_store(
  corpus, FeatureParams(**spec["params"]), spec["cache"], num_workers=1, progress=False
)
"""


def test_sigkill_mid_extraction_then_rebuild_extracts_only_the_rest(
  corpus, reference_build, tmp_path, monkeypatch
):
  """kill -9 while a chunk is half done: the partial store keeps the finished chunks, and
  the rebuild extracts the other clips only, to the bytes of an uninterrupted build."""
  marker = tmp_path / "hanging"
  spec = {
    "name": corpus.name,
    "class_names": corpus.class_names,
    "utterances": [dataclasses.astuple(u) for u in corpus.utterances],
    "params": dataclasses.asdict(PARAMS),
    "cache": str(tmp_path / "cache"),
    "hang_after": 7,  # Chunks [0, 1], [2, 3], [4, 5] recorded; clip 6 extracted, 7 not.
    "marker": str(marker),
  }
  process = subprocess.Popen(
    [sys.executable, "-c", _HANGING_BUILD, json.dumps(spec)],
    cwd=REPO,
    env={**os.environ, **TEST_ENV},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      if process.poll() is not None:
        pytest.fail(f"the build ended before it hung: {process.communicate()[1]}")
      if time.monotonic() > deadline:
        pytest.fail("the build did not reach its 7th clip in 120 s")
      time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.kill()
    process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert json.loads(marker.read_text()) == list(range(7))

  final = store.store_path(corpus, PARAMS, tmp_path / "cache")
  partial = final.with_name(final.name + ".partial")
  assert not final.exists()
  assert partial.is_dir()
  assert not (partial / "meta.json").exists()
  assert not (partial / "features.npy").exists()
  n_samples = np.load(partial / "n_samples.npy")
  done = np.flatnonzero(n_samples >= 0)
  pending = np.flatnonzero(n_samples == store.PENDING)
  assert 0 < len(done) < len(corpus.utterances)
  np.testing.assert_array_equal(done, np.arange(6))  # Clip 6's chunk was not recorded.
  np.testing.assert_array_equal(pending, np.arange(6, 12))
  # The rows recorded as done are already on disk with their final bytes.
  raw = np.load(partial / "raw_features.npy")
  reference = store.open_store(reference_build)
  np.testing.assert_array_equal(raw[done], reference.features[done])

  real_chunk = store._extract_chunk
  rebuilt = []

  def record(raw_path, params, job):
    rebuilt.extend(index for index, _ in job)
    return real_chunk(raw_path, params, job)

  monkeypatch.setattr(store, "_extract_chunk", record)
  assert _build(corpus, tmp_path / "cache") == final
  assert sorted(rebuilt) == pending.tolist()
  assert not partial.exists()
  assert _bytes(final) == _bytes(reference_build)


@pytest.mark.parametrize("crashed_file", ["labels.npy", "manifest.csv", "meta.json"])
def test_crash_while_finalising_then_resume_gives_identical_bytes(
  corpus, reference_build, tmp_path, monkeypatch, crashed_file
):
  """A crash as _finalise writes `crashed_file` (meta.json: its last write) leaves a
  .partial folder that the next build finishes."""
  for name in ("atomic_write_bytes", "atomic_write_csv", "atomic_write_json"):
    real = getattr(io_utils, name)

    def crash_at(path, *args, real=real, **kwargs):
      if pathlib.Path(path).name == crashed_file:
        raise RuntimeError(f"simulated crash while writing {crashed_file}")
      return real(path, *args, **kwargs)

    monkeypatch.setattr(io_utils, name, crash_at)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _build(corpus, tmp_path)
  final = store.store_path(corpus, PARAMS, tmp_path)
  assert not (final / "meta.json").exists()
  assert final.with_name(final.name + ".partial").is_dir()

  monkeypatch.undo()
  assert _build(corpus, tmp_path) == final
  assert _bytes(final) == _bytes(reference_build)
  assert sorted(p.name for p in final.iterdir()) == sorted(
    p.name for p in reference_build.iterdir()
  )


def test_a_full_disk_is_a_clear_error_and_the_build_resumes_once_there_is_room(
  corpus, reference_build, tmp_path, monkeypatch
):
  """posix_fallocate's ENOSPC stands in for a full disk, which would otherwise kill the
  process with SIGBUS as a memory map of the sparse file is written."""
  reserved = []

  def no_space(fd, offset, length):
    reserved.append(length)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "posix_fallocate", no_space)
  with pytest.raises(io_utils.DiskFullError, match=r"not enough disk space for raw_features"):
    _build(corpus, tmp_path)
  n_bins, n_frames = PARAMS.n_bins, PARAMS.n_frames
  assert reserved == [len(corpus.utterances) * n_bins * n_frames * 4 + 128]  # The .npy header.
  monkeypatch.undo()
  assert _bytes(_build(corpus, tmp_path)) == _bytes(reference_build)


def test_a_filesystem_without_fallocate_keeps_the_file_sparse(tmp_path, monkeypatch):
  def unsupported(fd, offset, length):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")

  monkeypatch.setattr(os, "posix_fallocate", unsupported)
  path = tmp_path / "sparse.bin"
  path.write_bytes(b"\0" * 4096)
  io_utils.reserve_disk_space(path)
  assert path.stat().st_size == 4096


def test_two_spawned_workers_give_the_same_bytes_as_one(corpus, reference_build, tmp_path):
  path = _build(corpus, tmp_path, num_workers=2)
  assert path.name == reference_build.name
  assert _bytes(path) == _bytes(reference_build)


def test_disk_rows_index_like_the_array_without_mapping_it(tmp_path):
  path = tmp_path / "rows.npy"
  array = np.random.default_rng(0).standard_normal((50, 3, 7)).astype(np.float32)
  np.save(path, array)
  rows = store.DiskRows(path)
  assert (rows.shape, rows.dtype, rows.ndim, len(rows)) == (array.shape, array.dtype, 3, 50)
  keys = [
    4,
    -1,
    slice(10, 20, 3),
    np.array([3, 4, 5, 9, 0, 0, 49]),  # Runs, repeats and an unsorted order.
    np.array([[1, 2], [7, 8]]),
    (6, slice(None), slice(0, 4)),
    (np.array([2, 3]), 1),
    np.array([], np.int64),
  ]
  for key in keys:
    np.testing.assert_array_equal(rows[key], array[key])
  np.testing.assert_array_equal(np.asarray(rows), array)
  with pytest.raises(IndexError):
    rows[np.array([50])]
  with pytest.raises(IndexError):
    rows[np.array([0.5])]
  # Read rows are copies: nothing of the file is mapped into the process.
  assert str(path) not in pathlib.Path("/proc/self/maps").read_text()


def test_disk_rows_reject_a_truncated_file(tmp_path):
  path = tmp_path / "rows.npy"
  np.save(path, np.ones((10, 4), np.float32))
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size - 8)
  rows = store.DiskRows(path)
  np.testing.assert_array_equal(rows[:5], np.ones((5, 4)))
  with pytest.raises(OSError, match="ends early"):
    rows[9]


_POOL_WHOSE_PARENT_DIES = """
import concurrent.futures, multiprocessing, os, time
from ser_jax import store
context = multiprocessing.get_context("spawn")
pool = concurrent.futures.ProcessPoolExecutor(
  1, mp_context=context, initializer=store.exit_with_parent, initargs=(os.getpid(),)
)
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f"/proc/{pid}/stat")  # A zombie no one reaps has exited too.
  return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_extraction_workers_end_when_their_parent_is_killed():
  parent = subprocess.Popen(
    [sys.executable, "-c", _POOL_WHOSE_PARENT_DIES],
    cwd=REPO,
    env={**os.environ, **TEST_ENV},
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _alive(worker), f"worker {worker} outlived its killed parent by 30 s"
  finally:
    parent.kill()
