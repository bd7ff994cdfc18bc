"""Test-session settings, applied before ser_jax is imported."""

import atexit
import os
import shutil
import tempfile

from helpers import TEST_XLA_FLAGS, with_test_xla_flags

# The malloc settings trade about a third more compile time for faster steps: a loss for
# tests, which compile many small programs. test_malloc.py checks them in subprocesses.
os.environ.setdefault("SER_JAX_MALLOC_TUNING", "0")

# Tests write nothing to the home folder, whatever the developer has set: the stores and
# the oneDNN library (built at collection time by test_onednn.py) go to $SER_JAX_CACHE,
# matplotlib's font cache to $MPLCONFIGDIR, both in one temporary folder per session that
# tests' subprocesses inherit through os.environ. xdist workers use the one their controller
# made, so the library is compiled once a session (a few seconds).
_SESSION_FOLDER = "SER_JAX_TEST_SESSION_FOLDER"
if not ("PYTEST_XDIST_WORKER" in os.environ and os.environ.get(_SESSION_FOLDER)):
  os.environ[_SESSION_FOLDER] = tempfile.mkdtemp(prefix="ser_jax_tests_")
  atexit.register(shutil.rmtree, os.environ[_SESSION_FOLDER], ignore_errors=True)
# The test process compiles like its subprocesses (helpers.TEST_XLA_FLAGS).
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ["SER_JAX_CACHE"] = os.path.join(os.environ[_SESSION_FOLDER], "cache")
os.environ["MPLCONFIGDIR"] = os.path.join(os.environ[_SESSION_FOLDER], "matplotlib")
