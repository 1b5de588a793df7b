"""Run folders: one writer at a time, and no silent config change on resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common.train import workdir as wd


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  with wd.WorkdirLock(str(tmp_path)):
    with pytest.raises(wd.WorkdirError) as e:
      wd.WorkdirLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert "is in use by another run" in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
  with wd.WorkdirLock(str(tmp_path)) as again:   # released: free again
    assert again.previous_holder is None         # a clean release leaves no holder behind


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  code = ("import sys, time; sys.path.insert(0, %r); from common.train.workdir import WorkdirLock;"
          "WorkdirLock(%r).acquire(); print('locked', flush=True); time.sleep(60)"
          % (os.getcwd(), str(tmp_path)))
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(wd.WorkdirError, match=f"pid {proc.pid}"):
      wd.WorkdirLock(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    lock = wd.WorkdirLock(str(tmp_path)).acquire()
    assert lock.took_over_stale and lock.previous_holder["pid"] == proc.pid
    lock.release()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_prepare_workdir_errors(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  with pytest.raises(wd.WorkdirError, match="exists and is not a folder"):
    wd.prepare_workdir(str(f))
  with pytest.raises(wd.WorkdirError, match="cannot create it"):
    wd.prepare_workdir(str(f / "sub"))
  assert wd.prepare_workdir(str(tmp_path / "a" / "b")).endswith("b")


def test_config_change_on_resume_refused_then_recorded(tmp_path):
  d = str(tmp_path)
  cfg = {"lr": 0.01, "seed": 0, "num_steps": 10, "model": {"layers": 2}}
  assert wd.check_config_on_resume(d, cfg, step=0, allow_change=False, extra={"x": 1}) == {}
  original = (tmp_path / "config.json").read_text()
  # same config, or a bookkeeping change, is accepted
  assert wd.check_config_on_resume(d, cfg, step=5, allow_change=False) == {}
  longer = dict(cfg, log_every=20)
  assert wd.check_config_on_resume(d, longer, step=5, allow_change=False) == {
      "log_every": (None, 20)}
  changed = dict(longer, lr=0.5, seed=7, model={"layers": 3})
  with pytest.raises(ValueError) as e:
    wd.check_config_on_resume(d, changed, step=10, allow_change=False)
  msg = str(e.value)
  assert "lr: 0.01 -> 0.5" in msg and "seed: 0 -> 7" in msg and "model.layers: 2 -> 3" in msg
  assert "\n" not in msg
  got = wd.check_config_on_resume(d, changed, step=10, allow_change=True)
  assert set(got) == {"lr", "seed", "model.layers"}
  assert (tmp_path / "config.json").read_text() == original   # never overwritten
  hist = [json.loads(l) for l in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [h["step"] for h in hist] == [5, 10]
  assert hist[1]["changes"]["lr"] == [0.01, 0.5]
  # the recorded change is now the baseline
  assert wd.check_config_on_resume(d, changed, step=12, allow_change=False) == {}
  assert wd.effective_config(d)["lr"] == 0.5
