"""User task files that are hostile or careless: every error is one line naming the file and
the 1-based line of the row, and comes at load time, never mid-run."""

import json

import pytest

from soft_grpo import tasks


def _one_line(fn, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as e:
    fn(*args, **kwargs)
  msg = str(e.value)
  assert "\n" not in msg, msg
  assert e.value.__cause__ is None and (e.value.__context__ is None
                                        or e.value.__suppress_context__)
  return msg


def _rows(n, long_at=None, long_text="x" * 50_000):
  return [{"problem": long_text if i == long_at else f"What is {i} + 1?", "answer": str(i + 1)}
          for i in range(n)]


def _write_jsonl(path, rows, blank_lines_before=()):
  lines = []
  for i, r in enumerate(rows):
    if i in blank_lines_before:
      lines.append("")
    lines.append(json.dumps(r))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_rows_carry_their_line_numbers(tmp_path):
  path = _write_jsonl(tmp_path / "t.jsonl", _rows(4), blank_lines_before=(2,))
  assert [r["line"] for r in tasks.load_tasks(path)] == [1, 2, 4, 5]


def test_over_long_row_is_rejected_at_load_with_its_line(tmp_path):
  # Row index 5 sits on line 8 (two blank lines before it): main said "problem 5" mid-run.
  path = _write_jsonl(tmp_path / "long.jsonl", _rows(10, long_at=5), blank_lines_before=(1, 3))
  msg = _one_line(tasks.load_tasks, path)
  assert f"task file {path} line 8: field 'problem' has 50000 characters" in msg
  assert "shorten or drop the row" in msg
  # The limit is a parameter; the same file loads with a larger one.
  assert len(tasks.load_tasks(path, max_chars=60_000)) == 10
  arr = tmp_path / "long.json"
  arr.write_text(json.dumps(_rows(4, long_at=2)))
  assert "array element 3: field 'problem'" in _one_line(tasks.load_tasks, str(arr))


def test_prompt_over_max_prompt_len_names_the_line(tmp_path):
  path = _write_jsonl(tmp_path / "t.jsonl", _rows(10, long_at=5, long_text="1 + " * 40),
                      blank_lines_before=(1, 3))
  rows = tasks.load_tasks(path)
  msg = _one_line(tasks.check_prompt_lengths, rows, lambda p: len(p.split()), 24, source=path)
  assert f"task file {path} line 8: the prompt has 80 tokens; allowed: <= 24" in msg
  assert "max_prompt_len" in msg
  tasks.check_prompt_lengths(rows, lambda p: len(p.split()), 80, source=path)  # fits: no error
  arith, _ = tasks.arithmetic_splits(tasks.TaskConfig(num_train=4, num_test=1))
  assert "task 'arithmetic' problem 0" in _one_line(
      tasks.check_prompt_lengths, arith, lambda p: 99, 24, source="arithmetic")


@pytest.mark.parametrize("data, fragment", [
    (bytes(range(256)) * 40, "line 2: not UTF-8 text (byte 128)"),  # byte 10 is a newline
    (b'{"problem": "a", "answer": "1"}\n\x00\x01\x02garbage\n', "line 2: NUL byte"),
    (b'{"problem": "a", "answer": "1"}\n\xff\xfe\n', "line 2: not UTF-8 text (byte 32)"),
])
def test_binary_garbage_names_the_file(tmp_path, data, fragment):
  path = tmp_path / "garbage.jsonl"
  path.write_bytes(data)
  assert f"task file {path} {fragment}" in _one_line(tasks.load_tasks, str(path))


def test_binary_parquet_names_the_file(tmp_path):
  pytest.importorskip("pyarrow")
  path = tmp_path / "garbage.parquet"
  path.write_bytes(b"\x00\x01 not parquet" * 50)
  assert f"task file {path}: not a readable parquet file" in _one_line(tasks.load_tasks,
                                                                       str(path))


def test_split_needs_a_row_on_each_side(tmp_path):
  rows = tasks.load_tasks(_write_jsonl(tmp_path / "one.jsonl", _rows(1)))
  msg = _one_line(tasks.split_rows, rows, 1, source="one.jsonl")
  assert "one.jsonl has 1 row(s)" in msg and "test split" in msg and "0 for training" in msg
  train, test = tasks.split_rows(tasks.load_tasks(_write_jsonl(tmp_path / "two.jsonl",
                                                               _rows(2))), 1, source="two")
  assert [r["line"] for r in test] == [1] and [r["line"] for r in train] == [2]
