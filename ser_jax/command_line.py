"""How the entry points without a --config (report, predict, data.info) read their command
lines: absl flags, parsed by absl.app for the process, or from a list of arguments for a
test. main and study define theirs with ser_jax/cli.py's config flag. Every entry point
parses with `parse_flags`: a bad flag is one line and exit status 2.

It imports no JAX, so that `report` and `data.info` start at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags


def run_flags(
  define: Callable[[flags.FlagValues], None],
  run: Callable[[flags.FlagValues, list[str]], int],
  argv: Sequence[str] | None = None,
) -> int:
  """Defines an entry point's flags (`define`), parses them and returns run(flags,
  positional arguments): its exit status.

  With `argv` None, this is the process's command line: the flags are absl's own (defined
  once per process), parsed by absl.app with its --help. Else `argv` (no program name) is
  parsed into a FlagValues of its own, so that a test calls one entry point after another;
  a bad flag or an app.UsageError is then one line and exit status 2.
  """
  if argv is None:
    define(flags.FLAGS)
    app.run(lambda args: run(flags.FLAGS, args[1:]), flags_parser=parse_flags)
  values = flags.FlagValues()
  define(values)
  try:
    return run(values, values(["", *argv])[1:])
  except (flags.Error, app.UsageError) as error:
    _exit_with(error)


def parse_flags(argv: list[str]) -> list[str]:
  """absl.app's flag parser (its `flags_parser`), with a bad flag as `error: <message>` on
  one line and exit status 2. absl's own prints "FATAL Flags parsing error" and a usage
  line, with status 1, and an exception inside a config file's get_config() (such as an
  argument it does not take) as a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _exit_with(error)


def _exit_with(error: Exception) -> NoReturn:
  """Prints `error: ` and the error's first line, with its last where it has more (the
  exception that ends a traceback), and exits with status 2."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}" if lines else repr(error)
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2) from None
