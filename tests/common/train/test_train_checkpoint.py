"""Orbax checkpointer: round trip with JSON extras, keep-last-N, corrupt-latest fallback."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.train.checkpoint import Checkpointer, abstract_like


def _state(seed):
  k = jax.random.key(seed)
  return {"params": {"w": jax.random.normal(k, (4, 3)), "layers": {0: jnp.arange(5.0) * seed}},
          "step": jnp.int32(seed), "rng": jax.random.key_data(k)}


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_last_n(tmp_path):
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=True)
  for s in (1, 2, 3):
    ck.save(s, _state(s), extras={"data_iter": {"next_index": 10 * s}})
  ck.wait()
  assert ck.all_steps() == [2, 3]
  step, state, extras = ck.restore_latest(abstract_like(_state(0)))
  assert step == 3 and extras == {"data_iter": {"next_index": 30}}
  _assert_equal(state, _state(3))
  ck.close()
  # A new manager on the same directory (a restarted run) sees the same steps.
  ck2 = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  assert ck2.latest_step() == 3
  ck2.close()


def _corrupt(step_dir):
  """Overwrite every array-data file of the step with garbage (bit rot / torn copy)."""
  n = 0
  for d, _, names in os.walk(os.path.join(step_dir, "state")):
    for name in names:
      path = os.path.join(d, name)
      if "ocdbt" in d or name.startswith("manifest") or os.sep + "d" + os.sep in path + os.sep:
        with open(path, "wb") as f:
          f.write(b"\x00garbage")
        n += 1
  assert n > 0


def test_corrupt_latest_falls_back_with_warning(tmp_path):
  root = str(tmp_path / "ckpt")
  ck = Checkpointer(root, keep=3, async_save=False)
  for s in (2, 4):
    ck.save(s, _state(s), extras={"s": s})
  ck.close()
  _corrupt(os.path.join(root, "4"))
  ck = Checkpointer(root, keep=3)
  with pytest.warns(RuntimeWarning, match="step 4 .* unreadable"):
    step, state, extras = ck.restore_latest(abstract_like(_state(0)))
  assert step == 2 and extras == {"s": 2}
  _assert_equal(state, _state(2))
  # The bad step was moved aside, so the resumed run can save step 4 again.
  assert ck.all_steps() == [2] and os.path.isdir(root + ".corrupt/4")
  ck.save(4, _state(5))
  ck.wait()
  _assert_equal(ck.restore_latest(abstract_like(_state(0)))[1], _state(5))
  ck.close()


def test_partial_checkpoint_is_ignored(tmp_path):
  root = str(tmp_path / "ckpt")
  ck = Checkpointer(root, keep=3, async_save=False)
  ck.save(1, _state(1))
  ck.close()
  # What a kill during an async save leaves: an unfinished temporary step directory.
  os.makedirs(os.path.join(root, "2.orbax-checkpoint-tmp-123", "state"))
  ck = Checkpointer(root, keep=3)
  step, state, _ = ck.restore_latest(abstract_like(_state(0)))
  assert step == 1
  _assert_equal(state, _state(1))
  ck.close()


def test_empty_directory_restores_nothing(tmp_path):
  ck = Checkpointer(str(tmp_path / "none"), keep=1)
  assert ck.restore_latest(abstract_like(_state(0))) is None
  ck.close()


def test_layout_mismatch_raises_and_deletes_nothing(tmp_path):
  import jax
  import jax.numpy as jnp
  root = str(tmp_path / "ck")
  ck = Checkpointer(root, keep=3, async_save=False)
  ck.save(1, {"w": jnp.ones((3,))})
  ck.save(2, {"w": jnp.ones((3,))})
  ck.wait()
  other = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}  # a changed model layout
  with pytest.raises(ValueError, match="nothing was deleted"):
    ck.restore_latest(other)
  assert ck.all_steps() == [1, 2] and not os.path.exists(root + ".corrupt")


def test_all_checkpoints_corrupt_says_so_and_deletes_nothing(tmp_path):
  root = str(tmp_path / "ck")
  ck = Checkpointer(root, keep=3, async_save=False)
  for s in (2, 4):
    ck.save(s, _state(s))
  ck.close()
  for s in (2, 4):
    _corrupt(os.path.join(root, str(s)))
  ck = Checkpointer(root, keep=3)
  with pytest.raises(ValueError) as e:
    ck.restore_latest(abstract_like(_state(0)))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{root}: all 2 checkpoint(s) are unreadable "
                                            "(corrupt or truncated files; newest, step 4: ")
  assert "nothing was deleted" in msg and "layout" not in msg
  assert ck.all_steps() == [2, 4] and not os.path.exists(root + ".corrupt")
  ck.close()


def test_unreadable_reason_never_prints_an_object_repr(tmp_path, monkeypatch):
  # Seen on main: "(newest, step 4: TypeError: <bound method pybind11_detail_function_record...>)".
  class Native:
    def method(self):
      pass
  root = str(tmp_path / "ck")
  ck = Checkpointer(root, keep=3, async_save=False)
  ck.save(1, _state(1))
  ck.wait()

  def broken(step, abstract_state):
    raise TypeError(Native().method)
  monkeypatch.setattr(ck, "restore", broken)
  with pytest.raises(ValueError) as e:
    ck.restore_latest(abstract_like(_state(0)))
  assert "<bound method" not in str(e.value) and "step 1: TypeError)" in str(e.value)
  ck.close()
