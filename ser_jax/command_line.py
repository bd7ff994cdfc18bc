"""How the entry points without a --config (report, predict, data.info) read their command
lines: absl flags, parsed by absl.app for the process, or from a list of arguments for a
test. main and study define theirs with ser_jax/cli.py's config flag.

It imports no JAX, so that `report` and `data.info` start at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

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
    app.run(lambda args: run(flags.FLAGS, args[1:]))
  values = flags.FlagValues()
  define(values)
  try:
    return run(values, values(["", *argv])[1:])
  except (flags.Error, app.UsageError) as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
