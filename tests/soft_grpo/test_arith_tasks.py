"""Arithmetic task generator and user task loaders."""

import json

import pytest

from soft_grpo import tasks


def _key(ex):
  return (ex["op"], min(ex["a"], ex["b"]), max(ex["a"], ex["b"]))


def test_deterministic_disjoint_and_correct():
  cfg = tasks.TaskConfig(num_train=3000, num_test=400, seed=7)
  train, test = tasks.arithmetic_splits(cfg)
  train2, test2 = tasks.arithmetic_splits(cfg)
  assert train == train2 and test == test2
  assert len(train) == 3000 and len(test) == 400
  # Disjoint by problem, commuted operands included.
  assert not {_key(e) for e in train} & {_key(e) for e in test}
  assert len({_key(e) for e in train}) == len(train)
  for ex in train + test:
    a, b = ex["a"], ex["b"]
    assert len(str(a)) == len(str(b)) and len(str(a)) in (2, 3)
    want = a + b if ex["op"] == "add" else a * b
    assert ex["answer"] == str(want)
    sym = "+" if ex["op"] == "add" else "*"
    assert ex["problem"] == f"What is {a} {sym} {b}?"
  assert {e["op"] for e in train} == {"add", "mul"}
  # Another seed gives other problems; growing the train split keeps the test split.
  other_train, other_test = tasks.arithmetic_splits(
      tasks.TaskConfig(num_train=3000, num_test=400, seed=8))
  assert other_test != test
  _, test_bigger = tasks.arithmetic_splits(
      tasks.TaskConfig(num_train=5000, num_test=400, seed=7))
  assert test_bigger == test


def test_small_space_is_exhausted_without_duplicates():
  # 1-digit addition: 9 * 10 / 2 = 45 unordered pairs.
  cfg = tasks.TaskConfig(ops=("add",), digits=(1,), num_train=40, num_test=5, seed=0)
  train, test = tasks.arithmetic_splits(cfg)
  assert len({_key(e) for e in train + test}) == 45
  with pytest.raises(ValueError, match="exceeds"):
    tasks.TaskConfig(ops=("add",), digits=(1,), num_train=40, num_test=6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(ops=("div",)), "ops"),
    (dict(ops=()), "ops"),
    (dict(digits=(0,)), "digits"),
    (dict(digits=(2, 10)), "digits"),
    (dict(num_train=-1), "num_train"),
    (dict(num_test=1.5), "num_test"),
    (dict(seed="x"), "seed"),
    (dict(source="missing.jsonl"), "source"),
    (dict(prompt="fancy"), "prompt"),
])
def test_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=rf"^task\.{field}: .*; allowed: ") as e:
    tasks.TaskConfig(**kwargs)
  assert "\n" not in str(e.value)


def test_config_accepts_lists():
  cfg = tasks.TaskConfig(ops=["add"], digits=[2], num_train=3, num_test=2)
  assert cfg.ops == ("add",) and cfg.digits == (2,)


def test_jsonl_loader(tmp_path):
  path = tmp_path / "t.jsonl"
  rows = [{"problem": "1+1?", "answer": 2, "solution": "..."}, {"problem": "x?", "answer": "\\frac12"}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  assert tasks.load_tasks(str(path)) == [{"problem": "1+1?", "answer": "2", "line": 1},
                                         {"problem": "x?", "answer": "\\frac12", "line": 2}]
  arr = tmp_path / "t.json"
  arr.write_text(json.dumps(rows))
  assert tasks.load_tasks(str(arr)) == [{"problem": "1+1?", "answer": "2", "row": 1},
                                        {"problem": "x?", "answer": "\\frac12", "row": 2}]
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(json.dumps({"question": "q", "final": "3"}) + "\n")
  assert tasks.load_jsonl(str(gsm), problem_key="question", answer_key="final") == [
      {"problem": "q", "answer": "3", "line": 1}]


def test_loader_errors_are_one_line(tmp_path):
  def err(path, **kw):
    with pytest.raises(ValueError) as e:
      tasks.load_tasks(str(path), **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg

  assert "does not exist" in err(tmp_path / "missing.jsonl")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  assert "empty" in err(empty)
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text(json.dumps({"problem": "p"}) + "\n")
  assert "'answer'" in err(nofield)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "p", "answer": 1}\n{oops\n')
  assert "line 2" in err(bad)
  assert "extension" in err(tmp_path / "x.csv")


def test_parquet_loader(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"], "extra": [0, 1]}), path)
  assert tasks.load_tasks(str(path)) == [{"problem": "a", "answer": "1", "row": 1},
                                         {"problem": "b", "answer": "2", "row": 2}]
  nofield = tmp_path / "n.parquet"
  pq.write_table(pa.table({"problem": ["a"]}), nofield)
  with pytest.raises(ValueError, match="'answer'"):
    tasks.load_tasks(str(nofield))
  empty = tmp_path / "e.parquet"
  pq.write_table(pa.table({"problem": pa.array([], pa.string()),
                           "answer": pa.array([], pa.string())}), empty)
  with pytest.raises(ValueError, match="empty"):
    tasks.load_tasks(str(empty))


def test_load_splits_from_a_file(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text("".join(json.dumps({"problem": f"p{i}", "answer": i}) + "\n" for i in range(30)))
  train, test = tasks.load_splits(tasks.TaskConfig(source=str(path), num_test=8))
  assert [r["problem"] for r in test] == ["p0", "p1", "p2"]      # min(8, 30 // 10)
  assert len(train) == 27 and train[0]["problem"] == "p3"
