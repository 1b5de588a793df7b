"""The one flag-parse wrapper of the entry points: `cli.run(main)` instead of `app.run(main)`.

Errors a user can make come out as ONE line on stderr, `error: ...`, with exit status 1 and no
traceback: a bad flag or --config value (unknown preset, unknown field, unparsable value, a
required flag left out) at parse time, and a ValueError / FileNotFoundError raised by `main`
(config validation, bad paths, one-line load errors). `main` returns an exit code (or None).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags

# What `main` may raise for bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, but a bad flag or --config is one line and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    print(f"error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown field>
    print(f"error: config.{str(e).strip(chr(34) + chr(39))}: unknown field; allowed: the "
          "fields of the config file", file=sys.stderr)
    sys.exit(1)


def run(main: Callable[[list[str]], int | None], *,
        errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
  """`app.run(main)` with one-line errors (see the module docstring)."""

  def wrapped(argv):
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(1)
    try:
      code = main(argv)
    except errors as e:
      print(f"error: {_first_line(e)}", file=sys.stderr)
      sys.exit(1)
    sys.exit(code or 0)

  app.run(wrapped, flags_parser=parse_flags)
