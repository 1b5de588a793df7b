"""Issue 14 item 3: `run.checkpoint_params_only` (make demo's small GRPO checkpoints) and the
evaluation progress bar, on the `test` preset (tiny random model, byte tokenizer)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from common.pretrained import restore_run_params
from experiments.configs.soft_grpo import get_config
from soft_grpo import learner as learner_lib


def _config(num_steps: int, params_only: bool):
  c = get_config("test")
  c.run.num_steps, c.run.checkpoint_every = num_steps, 1
  c.run.keep_checkpoints = 1
  c.run.checkpoint_params_only = params_only
  return c


def _step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def _bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _array_bytes(workdir, step, subtree) -> int:
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(_step_dir(workdir, step)) / "state")
  tree = getattr(meta, "tree", meta)
  return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
             for m in jax.tree.leaves(tree.get(subtree) or {}))


def _stored_keys(workdir, step) -> set:
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(_step_dir(workdir, step)) / "state")
  tree = getattr(meta, "tree", meta)
  return {k for k, v in tree.items() if jax.tree.leaves(v)}


def test_params_only_checkpoint_is_a_quarter_the_size_and_a_model_that_refuses_to_resume(
    tmp_path):
  full_dir, small_dir = str(tmp_path / "full"), str(tmp_path / "small")
  full, _ = learner_lib.train(_config(1, False), full_dir, log_fn=lambda *_: None)
  small, _ = learner_lib.train(_config(1, True), small_dir, log_fn=lambda *_: None)

  # Content: the default checkpoint is unchanged (optimizer state and reference policy in it);
  # the params-only one holds the policy and the small counters, nothing else.
  assert {"params", "opt_state", "ref_params"} <= _stored_keys(full_dir, 1)
  keys = _stored_keys(small_dir, 1)
  assert "params" in keys and not keys & {"opt_state", "ref_params"}
  extras = json.load(open(os.path.join(_step_dir(small_dir, 1), "extras", "metadata")))
  assert extras == {"data_position": 4, "params_only": True}
  full_extras = json.load(open(os.path.join(_step_dir(full_dir, 1), "extras", "metadata")))
  assert "params_only" not in full_extras
  # Size: params P, AdamW moments 2P, reference P -> a quarter of the array bytes (on disk,
  # compressed chunks and metadata make it roughly so).
  p = _array_bytes(full_dir, 1, "params")
  assert _array_bytes(full_dir, 1, "opt_state") >= 2 * p and _array_bytes(full_dir, 1,
                                                                          "ref_params") == p
  assert _bytes(_step_dir(small_dir, 1)) < 0.45 * _bytes(_step_dir(full_dir, 1))

  # The run folder is a model: its parameters are exactly the trained ones.
  step, flat = restore_run_params(small_dir)
  assert step == 1
  leaves = jax.tree_util.tree_flatten_with_path(small.params)[0]
  assert len(flat) == len(leaves)
  for path, leaf in leaves:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    np.testing.assert_array_equal(flat[name], np.asarray(leaf))
  # Same run, same seed: the only difference between the two runs is what was saved.
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(small.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Resume: refused with one line naming the option and the way out; nothing is touched.
  metrics_before = open(os.path.join(small_dir, "metrics.jsonl")).read()
  for params_only in (True, False):
    with pytest.raises(ValueError) as e:
      learner_lib.train(_config(2, params_only), small_dir, log_fn=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("run.checkpoint_params_only: checkpoint step 1 in ")
    assert "cannot resume training; allowed: use the run folder as a model" in msg
  assert open(os.path.join(small_dir, "metrics.jsonl")).read() == metrics_before
  assert not os.path.exists(os.path.join(small_dir, "config_history.jsonl"))
  assert os.path.isdir(_step_dir(small_dir, 1))

  # A full run may switch to params-only checkpoints when it resumes (bookkeeping: the math
  # is unchanged, the full step-1 state is restored); its next checkpoint is params-only.
  logs = []
  learner_lib.train(_config(2, True), full_dir, log_fn=logs.append)
  assert "resumed from step 1" in logs[0]
  assert set(os.listdir(os.path.join(full_dir, "checkpoints"))) >= {"2"}
  assert not _stored_keys(full_dir, 2) & {"opt_state", "ref_params"}


def test_config_rejects_non_bool_checkpoint_params_only():
  d = _config(1, True).to_dict()
  d["run"]["checkpoint_params_only"] = "yes"    # a dict, as a JSON / YAML source would give
  with pytest.raises(ValueError, match=r"^run\.checkpoint_params_only: .*True or False"):
    learner_lib.as_config(d)


def test_evaluate_shows_a_progress_bar_unless_run_progress_is_off(capsys):
  c = get_config("test")
  c.run.progress = True
  learner_lib.evaluate(c, 2, 3, seed=0, rows_per_call=4)
  err = capsys.readouterr().err
  assert "eval soft_gumbel (n=2):" in err and "0/3 [" in err     # over problems, on stderr
  c.run.progress = False
  learner_lib.evaluate(c, 2, 3, seed=0, rows_per_call=4)
  assert "eval " not in capsys.readouterr().err
