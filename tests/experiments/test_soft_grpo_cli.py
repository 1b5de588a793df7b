"""experiments.soft_grpo / eval_passk: config errors, train + resume through the library entry."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import eval_passk
from experiments import soft_grpo as sg
from experiments.configs.soft_grpo import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("field,value,match", [
    ("mode", "hard", r"config.mode='hard' is not one of"),
    ("top_p", 1.5, r"config.top_p must be in \(0, 1\]"),
    ("mini_batch_prompts", 3, r"config.mini_batch_prompts=3 must divide"),
    ("group_size", 1, r"config.group_size must be >= 2"),
    ("tau", 0.0, r"config.tau must be a number > 0"),
    ("eval_tau", 0.0, r"config.eval_tau must be a number > 0"),
    ("answer_format", "xml", r"config.answer_format='xml' is not one of"),
    ("think_budget", 99, r"config.think_budget must be in"),
])
def test_bad_config_one_line_errors(field, value, match):
  c = get_config("test")
  c[field] = value
  with pytest.raises(ValueError, match=match) as e:
    sg.validate_config(c)
  assert "\n" not in str(e.value)


def test_cli_prints_one_line_error(tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "experiments.soft_grpo",
       "--config=experiments/configs/soft_grpo.py:test", "--config.mode=hard",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode != 0
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.mode='hard'"), res.stderr[-2000:]


def test_train_resume_continues_identically(tmp_path):
  c = get_config("test")
  c.num_steps = 2
  full, hist_full = sg.train(c, str(tmp_path / "a"), log_fn=lambda *_: None)
  c1 = get_config("test")
  c1.num_steps = 1
  sg.train(c1, str(tmp_path / "b"), log_fn=lambda *_: None)
  logs = []
  resumed, hist_res = sg.train(c, str(tmp_path / "b"), log_fn=logs.append)
  assert logs and "resumed from step 1" in logs[0]
  assert [h["step"] for h in hist_res] == [2]
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("reward_mean", "kl", "grad_norm", "response_length", "data_position"):
    assert hist_full[-1][key] == hist_res[-1][key], key
  recs = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in recs] == [1, 2]
  assert os.path.isdir(tmp_path / "b" / "tb")


def test_eval_passk_tiny():
  res = eval_passk.run_eval("tiny", "soft_gumbel", 4, [1, 2, 4], 2, preset="test")
  assert res["n"] == 4 and res["num_problems"] == 2
  assert set(res["pass@k"]) == {1, 2, 4} and set(res["max_first_k"]) == {1, 2, 4}
  for k in (1, 2, 4):
    assert 0.0 <= res["pass@k"][k] <= 1.0
  assert res["pass@k"][1] == pytest.approx(res["mean@n"])
  table = eval_passk.markdown_table(res, "tiny")
  assert "| unbiased |" in table and "| max over first k |" in table
  with pytest.raises(ValueError, match="every k must be in"):
    eval_passk.parse_ks("1,8", 4)


@pytest.mark.parametrize("preset", ["official", "cpu_small", "test"])
def test_presets_validate(preset):
  c = get_config(preset)
  sg.validate_config(c)
  # Issue 11: official answer-phase sampling and evaluation tau in every preset; the official
  # preset aggregates the loss as verl does. The fields reach the library configs.
  from soft_grpo.trainer import ByteTokenizer
  g = sg.grpo_config(c, ByteTokenizer())
  assert (g.rollout.answer_top_k, g.rollout.answer_top_p, g.eval_tau) == (5, 0.95, 0.5)
  assert (g.loss.loss_agg, g.loss.loss_agg_micro_rows) == (
      ("token_mean_per_micro", 2) if preset == "official" else ("token_mean", 2))
  if preset == "official":
    assert (c.group_size, c.prompts_per_step, c.mini_batch_prompts) == (8, 64, 32)
    assert (c.learning_rate, c.weight_decay, c.grad_clip, c.kl_coef) == (1e-6, 0.01, 1.0, 1e-3)
    assert (c.top_k, c.top_p, c.tau, c.noise_factor) == (5, 0.95, 0.1, 1.0)
