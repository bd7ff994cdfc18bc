"""Test-session settings, applied before ser_jax is imported."""

import os

# The malloc settings trade about a third more compile time for faster steps: a loss for
# tests, which compile many small programs. test_malloc.py checks them in subprocesses.
os.environ.setdefault("SER_JAX_MALLOC_TUNING", "0")
