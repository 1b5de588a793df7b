"""The LM trainer end to end (test preset, byte-level stdlib corpus): kill -9 and resume
gives the uninterrupted run's metrics; non-finite losses; one-line config errors."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from common.train.metrics import read_metrics
from experiments import train_lm
from experiments.configs import ls_lm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = "--config=experiments/configs/ls_lm.py:test"


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "experiments.train_lm", PRESET, f"--workdir={workdir}",
          "--config.num_steps=12", "--config.async_checkpoint=True", *overrides]


def _env(cache_dir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if cache_dir:  # the resumed run reuses the executables compiled by the first runs
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _last_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  recs = read_metrics(path)
  return max((r["step"] for r in recs), default=0)


def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  env = _env(str(tmp_path / "jax_cache"))
  # The uninterrupted reference runs alongside the run that gets killed.
  ref = subprocess.Popen(_cmd(ref_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  kill_at = random.Random().randint(3, 9)
  print(f"killing at step >= {kill_at}")
  victim = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  # Kill once the chosen step is logged and some checkpoint is committed (async saves
  # finalize by renaming a temporary folder to the bare step number).
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  committed = lambda: os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  while ((_last_step(run_dir) < kill_at or not committed()) and victim.poll() is None
         and time.time() < deadline):
    time.sleep(0.02)
  assert victim.poll() is None, "the run finished before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = _last_step(run_dir)  # 12 only if the kill landed after the last step's log
  resumed = subprocess.run(_cmd(run_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # It really resumed from a checkpoint (saved every 2 steps), not from scratch.
  m = re.search(r"resumed \S+ at step (\d+)", resumed.stderr)
  assert m and 2 <= int(m.group(1)) <= killed_at, resumed.stderr[-2000:]
  out, err = ref.communicate(timeout=300)
  assert ref.returncode == 0, err[-3000:]
  ref_recs, run_recs = read_metrics(ref_dir), read_metrics(run_dir)
  # Train metrics every step, val metrics every eval_every: identical, bit for bit.
  assert [(r["step"], r["split"]) for r in run_recs] == [(r["step"], r["split"]) for r in ref_recs]
  for a, b in zip(ref_recs, run_recs):
    assert a == b, (killed_at, a, b)
  assert ref_recs[-1]["step"] == 12


def _quiet(c):
  c.progress = False
  c.tensorboard = False
  return c


def test_nonfinite_loss_skip_and_stop(tmp_path, capsys):
  c = _quiet(ls_lm.get_config("test"))
  c.update(num_steps=5, inject_nan_at_step=2, eval_every=5, ckpt_every=5, num_layers=1)
  summary = train_lm.train(c, str(tmp_path / "skip"))
  recs = read_metrics(str(tmp_path / "skip"), "train")
  bad = [r["step"] for r in recs if not r["finite"]]
  assert bad == [3]  # 0-based step 2 is the third step
  assert "non-finite loss (nan) at step 3; update skipped" in capsys.readouterr().err
  assert summary["num_nonfinite"] == 1 and summary["steps"] == 5
  assert all(r["finite"] for r in recs if r["step"] > 3)
  assert summary["final_val_loss"] < 6.0  # params stayed finite and useful

  c.nonfinite = "stop"
  with pytest.raises(train_lm.NonFiniteLoss, match="non-finite loss .* at step 3; stopping"):
    train_lm.train(c, str(tmp_path / "stop"))


@pytest.mark.parametrize("field,value,match", [
    ("attention", "flash", r"config.attention='flash' is not one of \['ls', 'mhsa'\]"),
    ("stabilizer", "magic", r"config.stabilizer='magic' is not one of"),
    ("seq_len", 64, r"config.seq_len=64 does not fit the learned positions"),
    ("data", "/no/such/corpus", r"config.data='/no/such/corpus': no such corpus path"),
    ("nonfinite", "ignore", r"config.nonfinite='ignore' is not one of \['skip', 'stop'\]"),
    ("num_local_heads", 2, r"config.num_local_heads=2 must be in \[0, 1\]"),
])
def test_bad_config_values_are_one_line_errors(field, value, match):
  c = ls_lm.get_config("test")
  c[field] = value
  with pytest.raises(ValueError, match=match) as e:
    train_lm.validate_config(c)
  assert "\n" not in str(e.value)


def test_unknown_preset_is_a_one_line_error():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    ls_lm.get_config("huge")


def test_empty_corpus_is_a_one_line_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  c = _quiet(ls_lm.get_config("test"))
  c.data = str(empty)
  with pytest.raises(ValueError, match="empty") as e:
    train_lm.train(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


def test_cli_prints_one_line_errors(tmp_path):
  for args, expect in (
      ([f"--config=experiments/configs/ls_lm.py:nope"], "unknown preset 'nope'"),
      ([PRESET, "--config.stabilizer=magic"], "config.stabilizer='magic' is not one of"),
  ):
    proc = subprocess.run([sys.executable, "-m", "experiments.train_lm", *args,
                           f"--workdir={tmp_path}/x"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_plot_runs_writes_pngs_and_table(tmp_path):
  from common.train.metrics import MetricsWriter
  from experiments import plot_runs
  dirs = []
  for name, growth in (("mhsa", 3.0), ("ls", 1.5)):
    w = MetricsWriter(str(tmp_path / name), tensorboard=False)
    for s in range(1, 6):
      w.write(s, "train", {"loss": 3.0 / s, "num_spikes": 1, "num_nonfinite": 0,
                           "max_logit_global": [growth * s, growth * s + 1],
                           "max_logit_local": [0.0, 0.0] if name == "mhsa" else [s, s]})
    w.write(5, "val", {"loss": 1.0, "ppl": 2.718})
    w.close()
    dirs.append(str(tmp_path / name))
  paths = plot_runs.plot_runs(dirs, str(tmp_path / "plots"))
  assert {os.path.basename(p) for p in paths} == {"loss.png", "val_ppl.png", "max_logit.png",
                                                 "max_logit_layers.png"}
  assert all(os.path.getsize(p) > 1000 for p in paths)
  table = plot_runs.summary_table(dirs)
  assert "| mhsa | 5 | 2.718 | 16.0 / 16.0 | - | 1 | 0 |" in table
  assert "| ls | 5 | 2.718 | 8.5 / 8.5 | 5.0 / 5.0 | 1 | 0 |" in table


def test_resume_with_a_different_model_is_a_one_line_error(tmp_path):
  import json
  c = ls_lm.get_config("test")
  mcfg = train_lm.model_config(c, 258)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"layout": train_lm._state_layout(c, mcfg)}, f, default=str)
  train_lm._check_same_run(str(tmp_path), c, mcfg)  # same layout: fine
  c.stabilizer = "qk_norm"
  with pytest.raises(ValueError, match=r"different model/optimizer layout \(model.qk_norm\)"):
    train_lm._check_same_run(str(tmp_path), c, train_lm.model_config(c, 258))
