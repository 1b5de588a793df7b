"""Tasks: procedurally generated arithmetic (the embedded default) and user files.

A task example is a dict {"problem": str, "answer": str}. Turning it into a prompt is
`soft_grpo.prompts`' job; `TaskConfig` is the `task` config section.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from soft_grpo import validate as v
from soft_grpo.prompts import PROMPT_STYLES

OPS = {"add": "+", "mul": "*"}
_S = "task"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The `task` section: where problems come from and how they are prompted.

  `source` "arithmetic": seeded problems whose operands both have `d` digits, d in `digits`
  (`num_train` / `num_test` / `seed`). Otherwise a .jsonl/.json/.parquet file with problem and
  answer fields; its first min(num_test, len/10) rows (at least 1) are the test split.
  """
  source: str = "arithmetic"
  prompt: str = "chat"            # a `soft_grpo.prompts.PROMPT_STYLES` key
  ops: tuple[str, ...] = ("add", "mul")
  digits: tuple[int, ...] = (2, 3)
  num_train: int = 2048
  num_test: int = 256
  seed: int = 0

  def __post_init__(self):
    # Configs may hand over lists; keep the dataclass hashable.
    if isinstance(self.ops, (list, str)):
      object.__setattr__(self, "ops", (self.ops,) if isinstance(self.ops, str) else tuple(self.ops))
    if isinstance(self.digits, list):
      object.__setattr__(self, "digits", tuple(self.digits))
    v.require(isinstance(self.source, str) and (
        self.source == "arithmetic" or os.path.exists(self.source)), _S, "source",
        self.source, "'arithmetic' or an existing .jsonl/.json/.parquet file")
    v.check_choice(_S, "prompt", self.prompt, PROMPT_STYLES)
    v.require(bool(self.ops) and all(op in OPS for op in self.ops), _S, "ops", self.ops,
              f"a non-empty subset of {sorted(OPS)}")
    v.require(bool(self.digits) and all(v.is_int(d) and 1 <= d <= 9 for d in self.digits),
              _S, "digits", self.digits, "a non-empty tuple of ints in [1, 9]")
    v.check_int(_S, "num_train", self.num_train, 0)
    v.check_int(_S, "num_test", self.num_test, 0)
    v.require(v.is_int(self.seed), _S, "seed", self.seed, "an int")
    capacity = _num_distinct_problems(self.ops, self.digits)
    if self.source == "arithmetic":
      v.require(self.num_train + self.num_test <= capacity, _S, "num_train",
                self.num_train, f"num_train + num_test <= {capacity}",
                problem=f"num_train + num_test = {self.num_train + self.num_test} exceeds the "
                f"{capacity} distinct problems for ops={self.ops}, digits={self.digits}")


def _num_distinct_problems(ops, digits) -> int:
  # Unordered operand pairs: a+b and b+a are the same problem.
  total = 0
  for d in set(digits):
    m = 9 * 10 ** (d - 1)
    total += len(set(ops)) * m * (m + 1) // 2
  return total


def _problem_text(op: str, a: int, b: int) -> str:
  return f"What is {a} {OPS[op]} {b}?"


def _answer(op: str, a: int, b: int) -> str:
  return str(a + b if op == "add" else a * b)


def arithmetic_splits(config: TaskConfig = TaskConfig()) -> tuple[list[dict], list[dict]]:
  """(train, test) lists of {"problem", "answer", "op", "a", "b"} dicts.

  Deterministic in `config.seed`.  Disjoint by problem: (op, {a, b}) never
  appears in both splits, so a commuted test item (b + a) is not a train item.
  """
  rng = np.random.default_rng(config.seed)
  ops = sorted(set(config.ops))
  digits = sorted(set(config.digits))
  wanted = config.num_train + config.num_test
  seen: set[tuple[str, int, int]] = set()
  items: list[tuple[str, int, int]] = []
  while len(items) < wanted:
    op = ops[rng.integers(len(ops))]
    d = digits[rng.integers(len(digits))]
    lo, hi = 10 ** (d - 1), 10 ** d
    a, b = (int(x) for x in rng.integers(lo, hi, size=2))
    key = (op, min(a, b), max(a, b))
    if key in seen:
      continue
    seen.add(key)
    items.append((op, a, b))
  examples = [{"problem": _problem_text(op, a, b), "answer": _answer(op, a, b),
               "op": op, "a": a, "b": b} for op, a, b in items]
  # The test split is drawn first so it does not change when num_train grows.
  return examples[config.num_test:], examples[:config.num_test]


# ----------------------------------------------------------------------------
# User task files.
# ----------------------------------------------------------------------------


# A problem or answer longer than this is almost surely a broken row (a whole document in one
# field); real math problems are < 2k characters. Checked at load time, with the line number.
MAX_FIELD_CHARS = 16_384


def _validate_rows(rows: list, path: str, problem_key: str, answer_key: str, *,
                   unit: str = "row", lines: list[int] | None = None,
                   max_chars: int = MAX_FIELD_CHARS) -> list[dict]:
  """{"problem", "answer", pos_key} dicts; pos_key is "line" (JSON lines) or "row" (JSON
  array, parquet), the row's 1-based position; errors name the file and that position."""
  pos_key = "line" if unit == "line" else "row"
  if not rows:
    raise ValueError(f"task file {path} is empty")
  out = []
  for n, row in enumerate(rows):
    line = lines[n] if lines else n + 1
    where = f"task file {path} {unit} {line}"
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    for key in (problem_key, answer_key):
      if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
      if len(str(row[key])) > max_chars:
        raise ValueError(f"{where}: field {key!r} has {len(str(row[key]))} characters; "
                         f"allowed: <= {max_chars}; shorten or drop the row")
    out.append({"problem": str(row[problem_key]), "answer": str(row[answer_key]), pos_key: line})
  return out


def load_jsonl(path: str, *, problem_key: str = "problem", answer_key: str = "answer",
               max_chars: int = MAX_FIELD_CHARS) -> list[dict]:
  """Rows of a JSON-lines file as {"problem", "answer", "line"} dicts (answers as str; `line`
  is the 1-based line of the row; rows of a .json array carry their 1-based "row" instead)."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"task file {path} line {line}: not UTF-8 text (byte {e.start}); expected "
                     "JSON lines, a JSON array or .parquet") from None
  if "\0" in text:
    line = text.count("\n", 0, text.index("\0")) + 1
    raise ValueError(f"task file {path} line {line}: NUL byte; expected JSON lines, a JSON "
                     "array or .parquet (is this a binary file?)")
  if text.lstrip().startswith("["):  # a .json file holding one array of rows
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"task file {path} line {e.lineno}: invalid JSON ({e.msg})") from None
    return _validate_rows(rows, path, problem_key, answer_key, unit="array element",
                          max_chars=max_chars)
  rows, lines = [], []
  for n, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"task file {path} line {n + 1}: invalid JSON ({e.msg})") from None
    lines.append(n + 1)
  return _validate_rows(rows, path, problem_key, answer_key, unit="line", lines=lines,
                        max_chars=max_chars)


def load_parquet(path: str, *, problem_key: str = "problem", answer_key: str = "answer",
                 max_chars: int = MAX_FIELD_CHARS) -> list[dict]:
  """Rows of a parquet file (needs the optional `pyarrow` package)."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} does not exist")
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError(
        f"task file {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-parquet bytes
    raise ValueError(f"task file {path}: not a readable parquet file ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]})") from None
  for key in (problem_key, answer_key):
    if key not in table.column_names:
      raise ValueError(
          f"task file {path}: missing field {key!r} (columns: {table.column_names})")
  return _validate_rows(table.select([problem_key, answer_key]).to_pylist(), path,
                        problem_key, answer_key, max_chars=max_chars)


def load_tasks(path: str, **keys) -> list[dict]:
  """Load a user task file by extension: .jsonl / .json (lines) or .parquet."""
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    return load_jsonl(path, **keys)
  if ext == ".parquet":
    return load_parquet(path, **keys)
  raise ValueError(f"task file {path}: extension {ext!r} is not one of .jsonl, .json, .parquet")


def split_rows(rows: list[dict], num_test: int, *, source: str) -> tuple[list[dict], list[dict]]:
  """(train, test): the first `num_test` rows are held out; both splits must be non-empty."""
  if not 1 <= num_test < len(rows):
    raise ValueError(f"task file {source} has {len(rows)} row(s): holding out {num_test} for the "
                     f"test split leaves {max(len(rows) - num_test, 0)} for training; both "
                     "splits need at least one row (give the file at least 2 rows)")
  return rows[num_test:], rows[:num_test]


def check_prompt_lengths(rows: Sequence[dict], num_tokens: Callable[[str], int], max_len: int,
                         *, source: str) -> None:
  """Raises, at load time, naming the line of the first row whose prompt is over `max_len`
  tokens (`num_tokens(problem)`), so a run never stops mid-training on it."""
  for i, row in enumerate(rows):
    n = num_tokens(row["problem"])
    if n > max_len:
      where = (f"task file {source} line {row['line']}" if "line" in row
               else f"task file {source} row {row['row']}" if "row" in row
               else f"task {source!r} problem {i}")
      raise ValueError(f"{where}: the prompt has {n} tokens; allowed: <= "
                       f"{max_len} (grpo.max_prompt_len); shorten or drop the row")


def load_splits(config: TaskConfig) -> tuple[list[dict], list[dict]]:
  """(train, test) problems of the `task` section."""
  if config.source == "arithmetic":
    return arithmetic_splits(config)
  rows = load_tasks(config.source)
  n_test = min(config.num_test, max(1, len(rows) // 10))
  return split_rows(rows, n_test, source=config.source)
