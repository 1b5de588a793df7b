"""One-line load errors: each names the file and the problem, and carries no chained traceback.

Callers (the CLI, `load_pretrained`) can catch `ValueError` / `FileNotFoundError` and print
`str(e)`; the messages never span lines.
"""

from __future__ import annotations

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
