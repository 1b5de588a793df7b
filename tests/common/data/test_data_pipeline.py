"""The grain packing pipeline: packing, determinism, mid-epoch resume, sharding, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.data import (iterator_state, iterator_state_to_bytes, make_eval_dataset,
                         make_lm_dataset, num_windows, restore_iterator_state)

T = 16
B = 4


@pytest.fixture(scope="module")
def tokens():
  # 40 windows of 16 (+1) tokens; random ids so any misalignment shows.
  return np.random.default_rng(0).integers(0, 258, size=40 * T + 1).astype(np.uint16)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _window_index(tokens, row):
  """The window i with tokens[i*T : i*T+T] == row (unique for random tokens)."""
  hits = [i for i in range(num_windows(tokens.size, T))
          if np.array_equal(tokens[i * T:i * T + T], row)]
  assert len(hits) == 1
  return hits[0]


def test_packing_targets_are_inputs_shifted(tokens):
  it = iter(make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=3))
  for batch in _take(it, 5):
    assert batch["inputs"].shape == (B, T) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    for row_in, row_tg in zip(batch["inputs"], batch["targets"]):
      i = _window_index(tokens, row_in)
      np.testing.assert_array_equal(row_tg, tokens[i * T + 1:i * T + T + 1])


def test_one_epoch_covers_every_window_once(tokens):
  ds = make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=1, num_epochs=1)
  seen = [_window_index(tokens, r) for b in ds for r in b["inputs"]]
  assert sorted(seen) == list(range(40))
  assert seen != sorted(seen)  # shuffled


def test_same_seed_same_batches_new_seed_differs(tokens):
  a = _take(iter(make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=7)), 15)
  b = _take(iter(make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=7)), 15)
  c = _take(iter(make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=8)), 15)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_epochs_are_reshuffled(tokens):
  it = iter(make_lm_dataset(tokens, seq_len=T, batch_size=B, seed=2))
  ep1 = np.concatenate([b["inputs"] for b in _take(it, 10)])
  ep2 = np.concatenate([b["inputs"] for b in _take(it, 10)])
  assert not np.array_equal(ep1, ep2)
  key = lambda x: sorted(map(bytes, x.astype(np.int32)))
  assert key(ep1) == key(ep2)


@pytest.mark.parametrize("n_before", [3, 13])  # mid-epoch, and past an epoch border
def test_resume_mid_epoch_from_serialized_state(tokens, n_before):
  kw = dict(seq_len=T, batch_size=B, seed=11, accum_steps=2)
  it = iter(make_lm_dataset(tokens, **kw))
  _take(it, n_before)
  state = iterator_state_to_bytes(it)
  assert json.loads(state) == iterator_state(it)
  expected = _take(it, 6)
  fresh = iter(make_lm_dataset(tokens, **kw))
  restore_iterator_state(fresh, state)
  got = _take(fresh, 6)
  for x, y in zip(expected, got):
    assert x["inputs"].shape == (2, B, T)
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


def test_shards_are_disjoint_equal_and_cover(tokens):
  per_shard = []
  for p in range(3):
    ds = make_lm_dataset(tokens, seq_len=T, batch_size=1, seed=5, num_epochs=1,
                         shard_index=p, shard_count=3)
    per_shard.append([_window_index(tokens, r) for b in ds for r in b["inputs"]])
  assert len({len(s) for s in per_shard}) == 1          # same number of batches everywhere
  flat = [i for s in per_shard for i in s]
  assert len(flat) == len(set(flat)) == 39               # 40 windows truncated to 3 * 13


def test_eval_dataset_is_fixed_and_finite(tokens):
  a = [b["inputs"] for b in make_eval_dataset(tokens, seq_len=T, batch_size=B)]
  b = [b["inputs"] for b in make_eval_dataset(tokens, seq_len=T, batch_size=B)]
  assert len(a) == 10
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  np.testing.assert_array_equal(a[0][0], tokens[:T])


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_len=0, batch_size=2), "seq_len"),
    (dict(seq_len=T, batch_size=0), "batch_size"),
    (dict(seq_len=T, batch_size=2, shard_index=2, shard_count=2), "shard_index"),
    (dict(seq_len=T, batch_size=64), "tokens"),
    (dict(seq_len=T, batch_size=2, num_epochs=0), "num_epochs"),
])
def test_bad_arguments_raise_one_line_errors(tokens, kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}") as e:
    make_lm_dataset(tokens, **kwargs)
  assert "\n" not in str(e.value)
