"""experiments.soft_grpo / eval_passk: thin entry points (one-line errors, library calls)."""

import os
import subprocess
import sys

import pytest

from experiments import eval_passk
from soft_grpo.pass_at_k import markdown_table, parse_ks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_prints_one_line_error(tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "experiments.soft_grpo",
       "--config=experiments/configs/soft_grpo.py:test", "--config.rollout.mode=hard",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode != 0
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: rollout.mode: got 'hard'; allowed: "), res.stderr[-2000:]


def test_misspelled_field_from_any_directory_is_one_line(tmp_path):
  """The default config file is found from another directory, and a misspelled nested field
  (applied by ml_collections while the flag is defined) is one line naming its whole path."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, "-m", "experiments.soft_grpo", "--config.rollout.mdoe=x",
                        f"--workdir={tmp_path}/w"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
  assert res.returncode == 1, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [
      'error: config.rollout.mdoe: unknown field; did you mean "mode"?; allowed: the fields '
      'of the config file']
  assert not os.path.exists(tmp_path / "w")


def test_cli_nan_learning_rate_is_one_line_and_writes_nothing(tmp_path):
  """Issue 12 row 1: learning_rate=nan is a one-line config error; no checkpoint is written."""
  res = subprocess.run(
      [sys.executable, "-m", "experiments.soft_grpo",
       "--config=experiments/configs/soft_grpo.py:test", "--config.run.num_steps=1",
       "--config.optim.learning_rate=nan", f"--workdir={tmp_path / 'nan'}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 1
  lines = res.stderr.strip().splitlines()
  assert lines == ["error: optim.learning_rate: got nan; allowed: a finite number in (0.0, inf)"], \
      res.stderr[-2000:]
  assert not (tmp_path / "nan" / "checkpoints").exists()


def test_cli_stop_on_bad_update_is_one_line(tmp_path):
  """lr 1e3 with run.nonfinite=stop ends with one line naming the step and the quantity."""
  res = subprocess.run(
      [sys.executable, "-m", "experiments.soft_grpo",
       "--config=experiments/configs/soft_grpo.py:test", "--config.run.num_steps=1",
       "--config.optim.learning_rate=1e3", "--config.run.nonfinite=stop",
       f"--workdir={tmp_path / 'hot'}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 1
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step 1: parameter norm jump"), res.stderr[-2000:]
  assert "Traceback" not in res.stderr


def test_cli_requires_workdir():
  res = subprocess.run(
      [sys.executable, "-m", "experiments.soft_grpo",
       "--config=experiments/configs/soft_grpo.py:test"], capture_output=True, text=True,
      timeout=300, cwd=ROOT)
  assert res.returncode != 0 and "--workdir" in res.stderr


def test_eval_passk_tiny():
  res = eval_passk.run_eval("tiny", "soft_gumbel", 4, [1, 2, 4], 2, preset="test")
  assert res["n"] == 4 and res["num_problems"] == 2
  assert set(res["pass@k"]) == {1, 2, 4} and set(res["max_first_k"]) == {1, 2, 4}
  for k in (1, 2, 4):
    assert 0.0 <= res["pass@k"][k] <= 1.0
  assert res["pass@k"][1] == pytest.approx(res["mean@n"])
  assert res["tau"] == 0.5
  table = markdown_table(res, "tiny")
  assert "| unbiased |" in table and "| max over first k |" in table
  with pytest.raises(ValueError, match="every k must be in"):
    parse_ks("1,8", 4)


def test_eval_overrides():
  c = eval_passk.eval_config("tiny", "discrete", preset="test",
                             overrides={"rollout.max_new_tokens": "12", "task.ops": ("add",)})
  assert c.rollout.max_new_tokens == 12 and c.rollout.tau == 0.1   # tau: soft modes only
  with pytest.raises(ValueError, match=r"--set rollout\.max_new_tokens='abc': not a int"):
    eval_passk.eval_config("tiny", "discrete", preset="test",
                           overrides={"rollout.max_new_tokens": "abc"})
  with pytest.raises(ValueError, match="unknown config field"):
    eval_passk.eval_config("tiny", "discrete", preset="test", overrides={"max_new_tokens": "1"})


def test_task_file_errors_come_at_build_time_with_the_line(tmp_path):
  """Issue 12 row 10: an over-long prompt on line 8 fails in build (before any step) naming
  the line, not at step 2 as "problem 5"; a one-row file says the split leaves no training."""
  import json
  from experiments.configs.soft_grpo import get_config
  from soft_grpo import learner
  rows = [{"problem": f"{i}+1" if i != 5 else "1+" * 40 + "1", "answer": str(i + 1)}
          for i in range(12)]
  lines = [json.dumps(r) for r in rows]
  lines[1:1] = [""]
  lines[4:4] = [""]
  path = tmp_path / "long.jsonl"
  path.write_text("\n".join(lines) + "\n")
  c = get_config("test")
  c.task.source = str(path)
  with pytest.raises(ValueError, match=r"long.jsonl line 8: the prompt has \d+ tokens; allowed: "
                                       r"<= 24 \(grpo.max_prompt_len\)"):
    learner.build(c)
  one = tmp_path / "one.jsonl"
  one.write_text(json.dumps(rows[0]) + "\n")
  c.task.source = str(one)
  with pytest.raises(ValueError, match=r"one.jsonl has 1 row\(s\): holding out 1 for the test "
                                       r"split leaves 0 for training"):
    learner.build(c)


def test_eval_passk_out_under_a_file_fails_before_evaluating(tmp_path):
  """Issue 12 row 11: --out under a file is one line, before any evaluation runs."""
  import time
  blocker = tmp_path / "afile"
  blocker.write_text("x")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.eval_passk", "--model=tiny",
                         "--preset=test", "--mode=discrete", "--n=2", "--k=1", "--num_problems=2",
                         f"--out={blocker}/eval.json"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --out {blocker}/eval.json: cannot "
                                                 "create its folder")
