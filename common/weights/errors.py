"""One-line load errors: each names the file and the problem, and carries no chained traceback.

Callers (the CLI, `load_pretrained`) can catch `ValueError` / `FileNotFoundError` and print
`str(e)`; the messages never span lines.
"""

from __future__ import annotations

import operator
import os


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


class WeightLoadError(ValueError):
  """A checkpoint/GGUF/tokenizer file exists but cannot be used. Message: '<file>: <problem>'."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path = os.fspath(path)
    self.problem = _one_line(problem)
    super().__init__(f"{self.path}: {self.problem}")


class WeightFileNotFoundError(WeightLoadError, FileNotFoundError):
  """The path (or a file a checkpoint references) does not exist."""


def checked_size(source: str | os.PathLike, key: str, value, limit: int) -> int:
  """`value` of the size field `key` of a weight file as an int in [1, limit], else a one-line
  WeightLoadError naming the file and field (zero heads would divide by zero later; a huge
  layer count would build a model for minutes before any tensor is checked)."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  elif not isinstance(value, bool) and hasattr(value, "__index__"):  # numpy ints from GGUF
    value = operator.index(value)
  if (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
    raise WeightLoadError(source, f"{key}={value!r} is out of range; allowed: an integer in "
                          f"[1, {limit}]")
  return value
