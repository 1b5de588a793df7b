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
  assert "step 3: non-finite loss (nan); update skipped" in capsys.readouterr().err
  assert summary["num_nonfinite"] == 1 and summary["steps"] == 5
  assert all(r["finite"] for r in recs if r["step"] > 3)
  assert summary["final_val_loss"] < 6.0  # params stayed finite and useful

  c.nonfinite = "stop"
  with pytest.raises(loop.NonFiniteLoss, match=r"^step 3: non-finite loss \(nan\); stopping"):
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


def test_blown_up_updates_are_skipped_and_never_checkpointed(tmp_path, capsys):
  """Issue 12 row 2: AdamW at lr 1e3 gives finite but absurd updates; the guard skips them
  (naming the parameter-norm jump, not a 'non-finite loss') and no checkpoint holds them."""
  import numpy as np
  from common.train.checkpoint import Checkpointer
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=4, lr=1e3, min_lr=0.0, warmup_steps=0, eval_every=4, ckpt_every=2,
           num_layers=1, max_bad_streak=50)
  summary = loop.train(c, str(tmp_path / "hot"))
  err = capsys.readouterr().err
  assert "parameter norm jump" in err and "non-finite loss" not in err
  assert summary["num_nonfinite"] == 4
  ckpt = Checkpointer(str(tmp_path / "hot" / "checkpoints"))
  assert ckpt.all_steps() == []   # every step was bad: nothing was saved
  ckpt.close()
  c.max_bad_streak = 2
  with pytest.raises(loop.NonFiniteLoss, match="2 bad updates in a row"):
    loop.train(c, str(tmp_path / "hot2"))


def test_busy_workdir_is_refused(tmp_path):
  """Issue 12 row 3: a second run on a busy workdir is refused at once, naming the holder."""
  import os
  import time
  from common.train.workdir import WorkdirError, WorkdirLock
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=2, eval_every=2, ckpt_every=2, num_layers=1)
  d = tmp_path / "busy"
  with WorkdirLock(str(d.mkdir() or d)):
    t0 = time.perf_counter()
    with pytest.raises(WorkdirError, match=f"in use by another run .*pid {os.getpid()}"):
      loop.train(c, str(d))
    assert time.perf_counter() - t0 < 10
  assert not (d / "metrics.jsonl").exists()   # the refused run wrote nothing


def test_config_change_on_resume(tmp_path):
  """Issue 12 row 4: a resume with another lr/seed is refused naming old/new values, or
  recorded with its step under allow_config_change; config.json is never rewritten."""
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=2, eval_every=2, ckpt_every=2, num_layers=1, async_checkpoint=False)
  d = str(tmp_path / "run")
  loop.train(c, d)
  original = open(f"{d}/config.json").read()
  c2 = _quiet(ls_lm.get_config("test"))
  c2.update(num_steps=3, eval_every=3, ckpt_every=3, num_layers=1, lr=0.5, seed=7,
            async_checkpoint=False)
  with pytest.raises(ValueError) as e:
    loop.train(c2, d)
  assert "lr: " in str(e.value) and "-> 0.5" in str(e.value) and "seed: 0 -> 7" in str(e.value)
  loop.train(c2, d, allow_config_change=True)
  assert open(f"{d}/config.json").read() == original
  hist = [json.loads(l) for l in open(f"{d}/config_history.jsonl")]
  assert hist[0]["step"] == 2 and hist[0]["changes"]["seed"] == [0, 7]
