"""Where a run keeps what: the workdir's folders and files, defined once.

<workdir>/config.json, results.json, results.md, predictions.csv, metrics.jsonl, *.png
<workdir>/fold_<k>/normalisation.npz, result.json, predictions.csv
<workdir>/fold_<k>/checkpoints/<epoch>/            a run trained in one chunk
<workdir>/fold_<k>/members_<a>-<b>/checkpoints/    a sweep trained in chunks: members a..b
<workdir>/tensorboard/fold_<k>[/members_<a>-<b>]/
"""

from __future__ import annotations

import os
import pathlib
import re

CONFIG = "config.json"
RESULTS = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS = "predictions.csv"
METRICS = "metrics.jsonl"
FOLD_RESULT = "result.json"
NORMALISATION = "normalisation.npz"
_FOLD = re.compile(r"fold_(\d+)")
_CHUNK = re.compile(r"members_(\d+)-(\d+)")


def fold_dir(workdir: str | os.PathLike, fold: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"fold_{fold}"


def chunk_name(chunk: range, n_members: int) -> str:
  """'' when one chunk holds every member, else members_<first>-<last>."""
  return "" if len(chunk) == n_members else f"members_{chunk.start}-{chunk.stop - 1}"


def chunk_dir(workdir, fold: int, chunk: range, n_members: int) -> pathlib.Path:
  """Checkpoints, result.json and predictions.csv of these members on this fold."""
  return fold_dir(workdir, fold) / chunk_name(chunk, n_members)


def tensorboard_dir(workdir, fold: int, chunk: range, n_members: int) -> pathlib.Path:
  return pathlib.Path(workdir) / "tensorboard" / f"fold_{fold}" / chunk_name(chunk, n_members)


def finished_folds(workdir: str | os.PathLike) -> list[int]:
  """Folds whose training finished (they wrote result.json), in order."""
  folds = []
  for path in pathlib.Path(workdir).glob(f"fold_*/{FOLD_RESULT}"):
    match = _FOLD.fullmatch(path.parent.name)
    if match:
      folds.append(int(match.group(1)))
  return sorted(folds)


def saved_chunks(fold_path: pathlib.Path) -> list[range]:
  """The member ranges a fold was trained in, from its members_* folders; [] for one chunk."""
  chunks = []
  for path in fold_path.glob("members_*-*"):
    match = _CHUNK.fullmatch(path.name)
    if match:
      chunks.append(range(int(match.group(1)), int(match.group(2)) + 1))
  return sorted(chunks, key=lambda chunk: chunk.start)


def member_checkpoints(workdir, fold: int, member: int) -> tuple[pathlib.Path, int | None]:
  """(checkpoint folder holding sweep member `member` of this fold, its index there).

  The index is None when the member is beyond every saved chunk (out of range).
  """
  path = fold_dir(workdir, fold)
  chunks = saved_chunks(path)
  if not chunks:
    return path / "checkpoints", member
  for chunk in chunks:
    if member in chunk:
      return path / _chunk_folder(chunk) / "checkpoints", member - chunk.start
  return path / "checkpoints", None


def n_saved_members(workdir, fold: int) -> int | None:
  """Members saved in chunks for this fold, or None when it was trained in one chunk."""
  chunks = saved_chunks(fold_dir(workdir, fold))
  return chunks[-1].stop if chunks else None


def _chunk_folder(chunk: range) -> str:
  return f"members_{chunk.start}-{chunk.stop - 1}"


def split_members(n_members: int, members_per_chunk: int) -> list[range]:
  """Consecutive member ranges of at most `members_per_chunk`, as even as possible."""
  n_chunks = -(-n_members // max(1, min(members_per_chunk, n_members)))
  size = -(-n_members // n_chunks)
  return [range(start, min(start + size, n_members)) for start in range(0, n_members, size)]
