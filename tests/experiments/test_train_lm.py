"""The LM trainer's command line (test preset, byte-level stdlib corpus): kill -9 and resume
gives the uninterrupted run's metrics; bad flags and configs are one-line errors; plots."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time


from common.train.metrics import read_metrics

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


def test_cli_prints_one_line_errors(tmp_path):
  for args, expect in (
      ([f"--config=experiments/configs/ls_lm.py:nope"], "unknown preset 'nope'"),
      ([PRESET, "--config.stabilizer=magic"], "model.stabilizer: got 'magic'; allowed: 'none'"),
      ([PRESET, "--config.no_such_field=1"], "config.no_such_field: unknown field"),
      ([PRESET, "--config.atention=ls"],
       'config.atention: unknown field; did you mean "attention"?'),
      (["--config.atention=ls"],          # the default config file: applied at definition
       'config.atention: unknown field; did you mean "attention"?'),
      ([PRESET, "--config.num_local_heads=3"], "model.num_local_heads: 3 is outside 0..num_heads=2"),
      ([PRESET], "Flag --workdir must have a value other than None"),
  ):
    workdir = [] if args == [PRESET] else [f"--workdir={tmp_path}/x"]
    proc = subprocess.run([sys.executable, "-m", "experiments.train_lm", *args, *workdir],
                          cwd=ROOT, env=_env(),
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
