"""The LM training loop (test preset, byte-level stdlib corpus): non-finite losses, the
stats-free step on non-logging steps, one-line data errors, resume with another layout."""

from __future__ import annotations

import json

import pytest

import ls_attention  # noqa: F401  (registers attention="ls")
from common.train import loop
from common.train.lm_config import LMConfig
from common.train.metrics import read_metrics
from experiments.configs import ls_lm


def _quiet(c):
  c.progress = False
  c.tensorboard = False
  return c


def test_nonfinite_loss_skip_and_stop(tmp_path, capsys):
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=5, inject_nan_at_step=2, eval_every=5, ckpt_every=5, num_layers=1)
  summary = loop.train(c, str(tmp_path / "skip"))
  recs = read_metrics(str(tmp_path / "skip"), "train")
  bad = [r["step"] for r in recs if not r["finite"]]
  assert bad == [3]  # 0-based step 2 is the third step
  assert "non-finite loss (nan) at step 3; update skipped" in capsys.readouterr().err
  assert summary["num_nonfinite"] == 1 and summary["steps"] == 5
  assert all(r["finite"] for r in recs if r["step"] > 3)
  assert summary["final_val_loss"] < 6.0  # params stayed finite and useful

  c.nonfinite = "stop"
  with pytest.raises(loop.NonFiniteLoss, match="non-finite loss .* at step 3; stopping"):
    loop.train(c, str(tmp_path / "stop"))


def test_attention_stats_only_on_stats_steps(tmp_path):
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=7, log_every=1, stats_every=3, eval_every=7, ckpt_every=7, num_layers=1)
  summary = loop.train(c, str(tmp_path / "run"))
  recs = read_metrics(str(tmp_path / "run"), "train")
  assert [r["step"] for r in recs] == list(range(1, 8))
  with_stats = [r["step"] for r in recs if "max_logit_global" in r]
  assert with_stats == [3, 6, 7]           # every stats_every steps, and the last step
  assert all(len(r["max_logit_global"]) == 1 and r["max_logit_global"][0] > 0
             for r in recs if "max_logit_global" in r)
  assert summary["max_logit_global"] == max(recs[-1]["max_logit_global"])
  # The stats-free step trains the same model: every step with stats gives the same losses.
  c.stats_every = 1
  loop.train(c, str(tmp_path / "all_stats"))
  ref = read_metrics(str(tmp_path / "all_stats"), "train")
  assert [r["loss"] for r in ref] == [r["loss"] for r in recs]
  assert all("max_logit_global" in r for r in ref)


def test_empty_corpus_is_a_one_line_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  c = _quiet(ls_lm.get_config("test"))
  c.data = str(empty)
  with pytest.raises(ValueError, match="empty") as e:
    loop.train(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


def test_resume_with_a_different_model_is_a_one_line_error(tmp_path):
  c = ls_lm.get_config("test")
  lc = LMConfig.from_config_dict(c)
  mcfg = lc.model_config(258)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"layout": loop.state_layout(lc, mcfg)}, f, default=str)
  loop.check_same_run(str(tmp_path), lc, mcfg)  # same layout: fine
  c.stabilizer = "qk_norm"
  lc = LMConfig.from_config_dict(c)
  with pytest.raises(ValueError, match=r"different model/optimizer layout \(model.qk_norm\)"):
    loop.check_same_run(str(tmp_path), lc, lc.model_config(258))
