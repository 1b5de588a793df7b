"""train_lm on JAX's multi-process runtime (gloo on CPU): 2 processes x 2 devices train the
test preset with the losses of 1 process x 4 devices, and a checkpoint written by the 2
processes resumes on 1 process x 4 devices with the losses of an all-1-process run.

These are the README's "two processes on one laptop" commands, with the step count changed.
"""

import json

import pytest

from common.train.metrics import read_metrics
from tests import multiprocess

COMMON = ["--config=experiments/configs/ls_lm.py:test", "--config.eval_every=100",
          "--config.ckpt_every=2", "--config.tensorboard=False", "--config.num_layers=1"]


def _run(workdir, steps, *extra, num_processes=1):
  args = [*COMMON, f"--config.num_steps={steps}", f"--workdir={workdir}", *extra]
  multiprocess.run_module("experiments.train_lm", args, num_processes=num_processes,
                          devices=4, timeout=400)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _run(one, 4)
  _run(two, 4, num_processes=2)
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
  for s in l1:
    assert abs(l2[s] - l1[s]) <= 1e-4 * abs(l1[s]), (s, l1[s], l2[s])
  # only process 0 wrote the record: one line per step
  assert len(read_metrics(str(two), "train")) == 4
  # the 2-process checkpoint continues on 1 process x 4 devices like the 1-process run does
  _run(one, 6, "--allow_config_change")
  _run(two, 6, "--allow_config_change")
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l2) == [1, 2, 3, 4, 5, 6]
  for s in (5, 6):
    assert abs(l2[s] - l1[s]) <= 1e-4 * abs(l1[s]), (s, l1[s], l2[s])
  summary = json.loads((two / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["wall_s"] > summary["wall_s_this_run"]
