"""Atomic file writes and file locks: a crash leaves the previous file, never half a file."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary sibling, fsyncs it, then renames it over `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """UTF-8; a file name's bytes that are not UTF-8 (surrogates in `text`) written as \\udcXX."""
  atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(
  path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]
) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  atomic_write_text(path, buffer.getvalue())


class LockedError(RuntimeError):
  """Another process holds the lock."""


class DiskFullError(OSError):
  """A file could not be given the disk space it needs."""


def reserve_disk_space(path: str | os.PathLike) -> None:
  """Allocates every block of the (sparse) file at `path` now, so that a full disk is this
  error instead of a SIGBUS when a memory map of it is written later. Filesystems without
  posix_fallocate keep the file sparse."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  if not size or not hasattr(os, "posix_fallocate"):
    return
  with open(path, "r+b") as f:
    try:
      os.posix_fallocate(f.fileno(), 0, size)
    except OSError as error:
      if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return  # EOPNOTSUPP, EINVAL: the filesystem cannot; the file stays sparse.
      free = shutil.disk_usage(path.parent).free
      path.unlink()
      raise DiskFullError(
        f"not enough disk space for {path.name} ({size / 2**20:.1f} MiB, {free / 2**20:.1f} "
        f"MiB free) in {path.parent}; free some, or point SER_JAX_CACHE at another disk",
      ) from error


@contextlib.contextmanager
def file_lock(
  path: str | os.PathLike, what: str, *, wait: bool = False, shared: bool = False
) -> Iterator[None]:
  """Holds an flock on `path` for the block; the OS releases it if the process dies.

  Exclusive, the file names its holder's pid; `shared`, any number of holders together keep
  out an exclusive one. With `wait`, blocks until the lock is free instead of raising
  LockedError.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
      fcntl.flock(f.fileno(), mode | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError as error:
      f.seek(0)
      holder = f.read().strip()
      raise LockedError(
        f"{what} is in use by another process{f' (pid {holder})' if holder else ''}; wait "
        f"for it to finish or stop it (lock file: {path})"
      ) from error
    f.seek(0)
    f.truncate()
    if not shared:  # Shared holders are not named: there may be several.
      f.write(str(os.getpid()))
      f.flush()
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
