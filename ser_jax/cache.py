"""Where ser_jax keeps what it can rebuild: feature stores, compiled programs, the CPU
backend's library and self-test verdicts."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "SER_JAX_CACHE"


def default_cache_dir() -> pathlib.Path:
  """$SER_JAX_CACHE, or ~/.cache/ser_jax."""
  return pathlib.Path(os.environ.get(ENV_VAR, "~/.cache/ser_jax")).expanduser()
