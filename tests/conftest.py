"""Test-session settings, applied before JAX starts."""

import atexit
import os
import shutil
import tempfile

from helpers import TEST_XLA_FLAGS, with_test_xla_flags

from ser_jax.cpu import xla_flags

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
# The test process compiles like its subprocesses (helpers.TEST_XLA_FLAGS), and like the
# entry points, with the XLA:CPU flags they set (cpu.tune_process; JAX reads them when its
# backend starts): in-process runs and the entry points' share compiled programs.
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))
xla_flags.apply()
os.environ["SER_JAX_CACHE"] = os.path.join(os.environ[_SESSION_FOLDER], "cache")
# Every compiled program, however small, shared by the test processes and their subprocesses.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ[_SESSION_FOLDER], "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ["MPLCONFIGDIR"] = os.path.join(os.environ[_SESSION_FOLDER], "matplotlib")

# xdist hands whole files to its workers in collection order (pyproject.toml: loadfile, no
# reordering): the longest files, as measured on 2 cores, go first, so that no worker is
# left with a long file while the others have finished.
LONGEST_FILES_FIRST = (
  "test_engine.py",
  "test_resume.py",
  "test_main.py",
  "test_study.py",
  "test_sweep.py",
  "test_train_step.py",
  "test_cpu_lowerings.py",
  "test_config.py",
  "test_sharding.py",
  "test_onednn.py",
  "test_emobox.py",
  "test_selftest.py",
  "test_onednn_isa.py",
  "test_predict.py",
  "test_demo.py",
  "test_study_compose.py",
  "test_store.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
