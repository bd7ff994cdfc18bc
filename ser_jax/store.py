"""The feature store: a corpus's features as arrays on disk, built once and reused.

A store is a folder `<cache_dir>/<corpus>-<kind>-<key>/` holding
  features.npy      float32 [N, n_bins, n_frames]
  labels.npy        int32 [N], indices into meta.json's class_names
  valid_frames.npy  int32 [N], frames that see audio before the end padding
  manifest.csv      utt_id, path, label, speaker, group (row i describes features[i]), and
                    for a corpus with its own folds `splits`: the role in each fold
                    (meta.json's fold_names), space-separated, '-' where a fold omits it
  skipped.csv       path, reason for files that could not be used
  notes.csv         path, note for files used whose metadata disagrees (where there are any)
  meta.json         corpus, class names, fold names, feature parameters, library versions

The key hashes the corpus listing (with file sizes and fold roles) and the feature parameters. It is
built in `<name>.partial/`, resumable row by row, and renamed into place only when
complete, so a folder without `.partial` is always finished. An opened store reads
feature rows from disk on demand (`DiskRows`), so a run's memory does not grow with it.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import pathlib
import platform
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np
import threadpoolctl
import tqdm

from ser_jax import audio, io_utils
from ser_jax.data.corpus import Corpus, CorpusError
from ser_jax.features import FeatureParams, compute_features

STORE_FORMAT = 1
PENDING, SKIPPED = -1, -2  # Values of the progress array; >= 0 is the clip's sample count.
_CHUNK = 8
_CLIPS_PER_WORKER = 64


class DiskRows:
  """A read-only .npy array [N, ...] whose rows are read from disk when indexed.

  Unlike a memmap, nothing is mapped into the process: rows are copied out with
  os.preadv, so resident memory does not grow with the file (the kernel's page cache
  still keeps what was read). Index with an int, a slice or an integer array of rows,
  optionally followed by indices into each row: rows[idx], rows[i, :, :n].
  """

  def __init__(self, path: str | os.PathLike):
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
      else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
      self._offset = f.tell()
    if fortran_order or dtype.hasobject or not shape:
      raise ValueError(f"{path}: expected a C-ordered numeric array with rows")
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    self._fd = os.open(path, os.O_RDONLY)
    weakref.finalize(self, os.close, self._fd)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    rows, within = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    if isinstance(rows, slice):
      rows = np.arange(*rows.indices(len(self)))
    indices = np.asarray(rows)
    if indices.dtype.kind not in "iu":
      raise IndexError(f"rows must be an int, a slice or integers, not {indices.dtype}")
    flat = indices.ravel().astype(np.int64)
    flat = np.where(flat < 0, flat + len(self), flat)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise IndexError(f"row index out of range for {len(self)} rows")
    out = self._read(flat).reshape(indices.shape + self.shape[1:])
    return out[(slice(None),) * indices.ndim + within] if within else out

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def _read(self, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` in that order, one read per run of consecutive rows."""
    out = np.empty((len(indices),) + self.shape[1:], self.dtype)
    buffer = out.reshape(len(indices), self._row_bytes // self.dtype.itemsize).view(np.uint8)
    start = 0
    while start < len(indices):
      stop = start + 1
      while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
        stop += 1
      offset = self._offset + int(indices[start]) * self._row_bytes
      expected = (stop - start) * self._row_bytes
      done = 0
      while done < expected:  # preadv may return less than asked for.
        n = os.preadv(self._fd, [buffer[start:stop].reshape(-1)[done:]], offset + done)
        if n == 0:
          raise OSError(f"feature file ends early at byte {offset + done}")
        done += n
      start = stop
    return out


@dataclasses.dataclass(frozen=True)
class FeatureStore:
  """An opened, complete store; `features` reads its rows from disk on demand."""

  path: pathlib.Path
  features: DiskRows  # [N, n_bins, n_frames]
  labels: np.ndarray  # [N]
  valid_frames: np.ndarray  # [N]
  manifest: tuple[dict[str, str], ...]
  meta: dict

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.meta["class_names"])

  @property
  def speakers(self) -> np.ndarray:
    return np.array([row["speaker"] for row in self.manifest])

  @property
  def groups(self) -> np.ndarray:
    return np.array([row["group"] for row in self.manifest])

  @property
  def corpus(self) -> str:
    return self.meta["corpus"]

  @property
  def fold_names(self) -> tuple[str, ...]:
    """The corpus's own folds (EmoBox's fold_<k>, a manifest's fold column); () if none."""
    return tuple(self.meta.get("fold_names", ()))

  @property
  def fold_roles(self) -> np.ndarray:
    """[N, len(fold_names)] 'train', 'test', 'valid' or '' (not in that fold)."""
    rows = [row["splits"].split() if self.fold_names else [] for row in self.manifest]
    return np.array([[_role(r) for r in row] for row in rows], dtype=object).reshape(
      len(self.manifest), len(self.fold_names)
    )

  def __len__(self) -> int:
    return len(self.labels)


def store_key(corpus: Corpus, params: FeatureParams) -> str:
  """Hash of the listing (ids, paths, labels, speakers, each file's size and modification
  time, fold roles) and feature parameters: a file edited in place gives a new store. Fold
  roles count only for corpora with folds."""
  listing = []
  for u in corpus.utterances:
    try:
      stat = os.stat(u.path)
      size, modified = stat.st_size, stat.st_mtime_ns
    except OSError:
      size = modified = -1
    listing.append([u.utt_id, u.path, u.label, u.speaker, u.group, size, modified])
    if corpus.fold_names:
      listing[-1].append(list(u.splits))
  contents = {
    "format": STORE_FORMAT,
    "corpus": corpus.name,
    "class_names": list(corpus.class_names),
    "listing": listing,
    "features": dataclasses.asdict(params),
  }
  if corpus.fold_names:
    contents["fold_names"] = list(corpus.fold_names)
  payload = json.dumps(contents, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def store_path(corpus: Corpus, params: FeatureParams, cache_dir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(cache_dir) / f"{corpus.name}-{params.kind}-{store_key(corpus, params)}"


def open_store(path: str | os.PathLike) -> FeatureStore:
  """Opens a complete store; the features stay on disk until rows are read."""
  path = pathlib.Path(path)
  if not (path / "meta.json").exists():
    raise FileNotFoundError(f"{path} is not a complete feature store (no meta.json)")
  meta = json.loads((path / "meta.json").read_text())
  with open(path / "manifest.csv", newline="") as f:
    manifest = tuple(csv.DictReader(f))
  return FeatureStore(
    path=path,
    features=DiskRows(path / "features.npy"),
    labels=np.load(path / "labels.npy"),
    valid_frames=np.load(path / "valid_frames.npy"),
    manifest=manifest,
    meta=meta,
  )


def build_store(
  corpus: Corpus,
  params: FeatureParams,
  cache_dir: str | os.PathLike,
  *,
  num_workers: int = 0,
  strict: bool = False,
  progress: bool | None = None,
) -> pathlib.Path:
  """Builds the store if it does not exist yet (resuming a partial one) and returns its path."""
  if not corpus.utterances:
    raise CorpusError(f"corpus '{corpus.name}' lists no utterances; nothing to extract")
  final = store_path(corpus, params, cache_dir)
  if (final / "meta.json").exists():
    return final
  partial = final.with_name(final.name + ".partial")
  # Another process building the same store (a second run, or another host's process on a
  # shared disk) is waited for, then its finished store is used.
  lock = final.with_name(final.name + ".lock")
  with io_utils.file_lock(lock, f"feature store {final}", wait=True):
    if (final / "meta.json").exists():  # Finished by another process while we waited.
      logging.info("Feature store %s was built by another process; using it", final)
      return final
    logging.info("Building feature store %s (%d clips)", final, len(corpus.utterances))
    partial.mkdir(parents=True, exist_ok=True)
    progress_path = _extract(corpus, params, partial, num_workers, strict, progress)
    _finalise(corpus, params, partial, progress_path)
    os.replace(partial, final)
  return final


def _create_array(path: pathlib.Path, shape: tuple[int, ...], dtype, fill=None) -> None:
  """Creates a full-size .npy file under a temporary name, then renames it into place."""
  if path.exists():
    return
  tmp = path.with_name(path.name + ".tmp")
  array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
  io_utils.reserve_disk_space(tmp)
  if fill is not None:
    array[...] = fill
  array.flush()
  del array
  os.replace(tmp, path)


def _extract(corpus, params, partial, num_workers, strict, progress) -> pathlib.Path:
  n = len(corpus.utterances)
  raw_path = partial / "raw_features.npy"
  progress_path = partial / "n_samples.npy"
  reasons_path = partial / "skipped.jsonl"
  if (partial / "features.npy").exists():  # Extraction finished; a crash hit _finalise.
    return progress_path
  _create_array(raw_path, (n, params.n_bins, params.n_frames), np.float32)
  _create_array(progress_path, (n,), np.int64, fill=PENDING)
  n_samples = np.load(progress_path, mmap_mode="r+")
  pending = np.flatnonzero(n_samples == PENDING)
  if len(pending) < n:
    logging.info("Resuming feature store %s: %d of %d clips done", partial, n - len(pending), n)
  jobs = [
    [(int(i), corpus.utterances[i].path) for i in pending[start : start + _CHUNK]]
    for start in range(0, len(pending), _CHUNK)
  ]
  if not num_workers:
    # A spawned worker costs seconds to start (imports, numba compilation in librosa), so
    # the automatic choice gives each worker at least _CLIPS_PER_WORKER clips.
    num_workers = max(1, min(os.cpu_count() or 1, len(pending) // _CLIPS_PER_WORKER))
  bar = tqdm.tqdm(
    total=n, initial=n - len(pending), desc="features", unit="clip", disable=_quiet(progress)
  )

  def record(results) -> None:
    for index, count, reason in results:
      if reason is not None:
        if strict:
          raise audio.AudioError(f"{corpus.utterances[index].path}: {reason}")
        with open(reasons_path, "a") as f:
          f.write(json.dumps({"index": index, "reason": reason}) + "\n")
      n_samples[index] = SKIPPED if reason is not None else count
    n_samples.flush()
    bar.update(len(results))

  if num_workers == 1 or len(jobs) <= 1:
    for job in jobs:
      record(_extract_chunk(str(raw_path), params, job))
  else:
    context = multiprocessing.get_context("spawn")  # Forking after JAX starts can deadlock.
    with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
      futures = [pool.submit(_extract_chunk, str(raw_path), params, job) for job in jobs]
      try:
        for future in concurrent.futures.as_completed(futures):
          record(future.result())
      except BaseException:
        for future in futures:
          future.cancel()
        raise
  bar.close()
  return progress_path


def exit_with_parent(parent_pid: int) -> None:
  """Worker initializer: the worker ends once its parent has (a parent killed with -9 would
  otherwise leave its workers waiting on their queue for ever)."""

  def watch() -> None:
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _extract_chunk(raw_path: str, params: FeatureParams, job: Sequence[tuple[int, str]]):
  """Worker: computes features for (index, path) pairs and writes them into the raw memmap.

  BLAS runs single-threaded here, in-process and in every worker: the bytes then do not
  depend on the worker count, and 2 workers on 2 cores no longer run 2 BLAS threads each
  (which made them slower than 1 worker; benchmarks/NOTES.md).
  """
  raw = np.load(raw_path, mmap_mode="r+")
  with threadpoolctl.threadpool_limits(1):
    results = [_extract_one(raw, index, path, params) for index, path in job]
  raw.flush()
  return results


def _extract_one(raw, index: int, path: str, params: FeatureParams):
  try:
    waveform = audio.load_audio(path, params.sample_rate)
  except audio.AudioError as error:
    return index, 0, str(error)
  raw[index] = compute_features(waveform, params)
  return index, len(waveform), None


def _finalise(corpus: Corpus, params: FeatureParams, partial: pathlib.Path, progress_path) -> None:
  n_samples = np.load(progress_path)
  good = np.flatnonzero(n_samples >= 0)
  if len(good) == 0:
    raise CorpusError(f"no audio file of corpus '{corpus.name}' could be read; see {partial}")
  reasons = {}
  reasons_path = partial / "skipped.jsonl"
  if reasons_path.exists():
    for line in reasons_path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        reasons[record["index"]] = record["reason"]
  raw_path = partial / "raw_features.npy"
  features_path = partial / "features.npy"
  if features_path.exists():
    pass  # Written before a crash; the raw rows were all extracted, so it is complete.
  elif len(good) == len(n_samples):
    os.replace(raw_path, features_path)
  else:
    raw = np.load(raw_path, mmap_mode="r")
    tmp = partial / "features.npy.tmp"
    out = np.lib.format.open_memmap(
      tmp, mode="w+", dtype=np.float32, shape=(len(good),) + raw.shape[1:]
    )
    io_utils.reserve_disk_space(tmp)
    for start in range(0, len(good), 256):
      out[start : start + 256] = raw[good[start : start + 256]]
    out.flush()
    del out, raw
    os.replace(tmp, features_path)

  class_index = {name: i for i, name in enumerate(corpus.class_names)}
  utterances = [corpus.utterances[i] for i in good]
  labels = np.array([class_index[u.label] for u in utterances], dtype=np.int32)
  valid = np.array([params.valid_frames(int(n_samples[i])) for i in good], dtype=np.int32)
  io_utils.atomic_write_bytes(partial / "labels.npy", _npy_bytes(labels))
  io_utils.atomic_write_bytes(partial / "valid_frames.npy", _npy_bytes(valid))
  columns = ["utt_id", "path", "label", "speaker", "group"]
  manifest_rows = [[u.utt_id, u.path, u.label, u.speaker, u.group] for u in utterances]
  if corpus.fold_names:
    columns.append("splits")
    for row, u in zip(manifest_rows, utterances, strict=True):
      row.append(" ".join(role or _NOT_IN_FOLD for role in u.splits))
  io_utils.atomic_write_csv(partial / "manifest.csv", columns, manifest_rows)
  if corpus.notes:
    io_utils.atomic_write_csv(
      partial / "notes.csv", ("path", "note"), [(n.path, n.reason) for n in corpus.notes]
    )
  skipped_rows = [(s.path, s.reason) for s in corpus.skipped]
  skipped_rows += [
    (corpus.utterances[i].path, reasons.get(int(i), "unreadable audio"))
    for i in np.flatnonzero(n_samples == SKIPPED)
  ]
  io_utils.atomic_write_csv(partial / "skipped.csv", ("path", "reason"), skipped_rows)
  io_utils.atomic_write_json(
    partial / "meta.json", _meta(corpus, params, len(good), len(skipped_rows))
  )
  # Only once meta.json is written: a crash before then resumes from these.
  for leftover in (progress_path, reasons_path, raw_path):
    leftover.unlink(missing_ok=True)


def _meta(corpus: Corpus, params: FeatureParams, n_clips: int, n_skipped: int) -> dict:
  versions = {}
  for package in ("numpy", "librosa", "soundfile", "soxr"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = "unknown"
  versions["python"] = platform.python_version()
  return {
    "format": STORE_FORMAT,
    "corpus": corpus.name,
    "class_names": list(corpus.class_names),
    **({"fold_names": list(corpus.fold_names)} if corpus.fold_names else {}),
    "n_clips": n_clips,
    "n_skipped": n_skipped,
    "features": dataclasses.asdict(params),
    "n_bins": params.n_bins,
    "n_frames": params.n_frames,
    "db_reference": "ref=1.0 (absolute), top_db=80",
    "versions": versions,
  }


_NOT_IN_FOLD = "-"


def _role(text: str) -> str:
  return "" if text == _NOT_IN_FOLD else text


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _quiet(progress: bool | None) -> bool | None:
  """tqdm's `disable`: None hides the bar when output is not a terminal."""
  return None if progress is None else not progress
