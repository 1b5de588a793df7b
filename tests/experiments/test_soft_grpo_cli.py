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
