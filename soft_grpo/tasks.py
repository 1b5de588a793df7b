"""Tasks: procedurally generated arithmetic (the embedded default) and user files.

A task example is a dict {"problem": str, "answer": str}. Turning it into a prompt is
`soft_grpo.prompts`' job; `TaskConfig` is the `task` config section.
"""

from __future__ import annotations

import dataclasses
import json
import os

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


def _validate_rows(rows: list, path: str, problem_key: str, answer_key: str) -> list[dict]:
  if not rows:
    raise ValueError(f"task file {path} is empty")
  out = []
  for n, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ValueError(f"task file {path} row {n}: expected an object, got {type(row).__name__}")
    for key in (problem_key, answer_key):
      if key not in row or row[key] is None:
        raise ValueError(f"task file {path} row {n}: missing field {key!r}")
    out.append({"problem": str(row[problem_key]), "answer": str(row[answer_key])})
  return out


def load_jsonl(path: str, *, problem_key: str = "problem",
               answer_key: str = "answer") -> list[dict]:
  """Rows of a JSON-lines file as {"problem", "answer"} dicts (answers as str)."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} does not exist")
  rows = []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):  # a .json file holding one array of rows
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"task file {path}: invalid JSON ({e.msg})") from None
    return _validate_rows(rows, path, problem_key, answer_key)
  for n, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"task file {path} line {n + 1}: invalid JSON ({e.msg})") from None
  return _validate_rows(rows, path, problem_key, answer_key)


def load_parquet(path: str, *, problem_key: str = "problem",
                 answer_key: str = "answer") -> list[dict]:
  """Rows of a parquet file (needs the optional `pyarrow` package)."""
  if not os.path.isfile(path):
    raise ValueError(f"task file {path} does not exist")
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError(
        f"task file {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
  table = pq.read_table(path)
  for key in (problem_key, answer_key):
    if key not in table.column_names:
      raise ValueError(
          f"task file {path}: missing field {key!r} (columns: {table.column_names})")
  return _validate_rows(table.select([problem_key, answer_key]).to_pylist(), path,
                        problem_key, answer_key)


def load_tasks(path: str, **keys) -> list[dict]:
  """Load a user task file by extension: .jsonl / .json (lines) or .parquet."""
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json"):
    return load_jsonl(path, **keys)
  if ext == ".parquet":
    return load_parquet(path, **keys)
  raise ValueError(f"task file {path}: extension {ext!r} is not one of .jsonl, .json, .parquet")


def load_splits(config: TaskConfig) -> tuple[list[dict], list[dict]]:
  """(train, test) problems of the `task` section."""
  if config.source == "arithmetic":
    return arithmetic_splits(config)
  rows = load_tasks(config.source)
  n_test = min(config.num_test, max(1, len(rows) // 10))
  return rows[n_test:], rows[:n_test]
