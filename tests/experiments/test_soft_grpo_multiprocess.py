"""soft_grpo on JAX's multi-process runtime (gloo on CPU): 2 processes x 2 devices train the
test preset with the losses of 1 process x 4 devices (each process builds, decodes and scores
the groups of its own prompts), and a checkpoint written by the 2 processes resumes on
1 process x 4 devices with the losses of an all-1-process run (the data position is global).
"""

import os

import pytest

from common.train.metrics import read_metrics
from tests import multiprocess

# Greedy-like sampling (T 1e-4): the 2- and 1-process states differ by float32 reduction order
# (~1e-7 relative), and the tiny random policy's near-uniform logits have near-ties that this
# flips at T 0.7 and even at T 0.05 (measured: step-2 loss 5% apart), after which the runs are
# different trajectories and no tolerance compares them. At T 1e-4 they agree to 1e-4.
COMMON = ["--config=experiments/configs/soft_grpo.py:test", "--config.run.checkpoint_every=2",
          "--config.rollout.temperature=0.0001"]


def _run(workdir, steps, *, num_processes=1):
  args = [*COMMON, f"--config.run.num_steps={steps}", f"--workdir={workdir}"]
  multiprocess.run_module("experiments.soft_grpo", args, num_processes=num_processes,
                          devices=4, timeout=500)


def _metrics(workdir):
  return {r["step"]: r for r in read_metrics(str(workdir), "train")}


def _close(a, b, key):
  # rel 1e-4, plus 1e-6 absolute: when a step's rewards are all equal the gradient is the KL
  # term's alone (norm ~2e-5), a difference of nearly equal log-probs whose float32
  # reduction order differs between the gloo and the in-process all-reduce.
  return abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-6


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _run(one, 2)
  _run(two, 2, num_processes=2)
  m1, m2 = _metrics(one), _metrics(two)
  assert sorted(m1) == sorted(m2) == [1, 2]
  assert len(read_metrics(str(two), "train")) == 2      # only process 0 wrote the record
  for s in m1:
    for key in ("loss", "pg_loss", "grad_norm", "reward_mean", "response_length"):
      assert _close(m1[s], m2[s], key), (s, key, m1[s][key], m2[s][key])
    # kl is a mean of differences of nearly equal log-probs (1e-5..1e-3): reduction-order
    # drift between the gloo and in-process all-reduce moves it by ~1e-7..1e-6 absolute.
    assert abs(m1[s]["kl"] - m2[s]["kl"]) <= 5e-6, (s, m1[s]["kl"], m2[s]["kl"])
    assert m2[s]["data_position"] == m1[s]["data_position"]
  # the 2-process checkpoint (step 2) continues on 1 process x 4 devices like the 1-process run
  _run(one, 3)
  _run(two, 3)
  m1, m2 = _metrics(one), _metrics(two)
  assert sorted(m2) == [1, 2, 3]
  for key in ("loss", "pg_loss", "grad_norm", "reward_mean", "response_length"):
    assert _close(m1[3], m2[3], key), (key, m1[3][key], m2[3][key])
  # kl (~3e-3) is a mean of differences of nearly equal log-probs: the float32 reduction-order
  # drift of two steps (gloo vs in-process all-reduce) moves it by ~1e-6 absolute (~3e-4 rel).
  assert abs(m1[3]["kl"] - m2[3]["kl"]) <= 5e-6, (m1[3]["kl"], m2[3]["kl"])
  assert os.path.exists(two / "config_history.jsonl")   # num_steps 2 -> 3, recorded
