"""Grain pipelines: a flat token stream packed into (inputs, targets) windows, batched.

Packing. Window i is tokens[i*T : i*T + T + 1] (T = seq_len); inputs = window[:-1],
targets = window[1:]. Consecutive windows overlap by one token, so every token after the
first is a target exactly once per epoch. Documents run across window borders, separated by
EOS (the usual LM pre-training packing; attention is not masked at EOS).

Order. A `grain.MapDataset` over window indices: shuffle (seeded; a new permutation every
epoch, `MapDataset.shuffle` + `repeat`) -> global batches of indices -> this process's rows ->
window lookup. Every element is a pure function of (seed, index), so the pipeline is
deterministic, and the iterator's state is only the next index: `{"next_index": n}` (JSON),
restorable mid-epoch into a freshly built iterator.

Sharding. The global batch sequence does not depend on the number of processes: process p of
P takes rows [p*B, (p+1)*B) of every global batch of B*P windows (`batch_size` B is the
per-process batch) and reads only those windows. So 2 processes x 2 devices train on exactly
the batches 1 process x 4 devices does, and a checkpoint's iterator state (counted in global
batches) restores under any process count.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np


def num_windows(num_tokens: int, seq_len: int) -> int:
  """How many (seq_len + 1)-token windows, stride seq_len, fit in num_tokens tokens."""
  return max((num_tokens - 1) // seq_len, 0)


class _Window:
  """index -> {"inputs": int32 [T], "targets": int32 [T]} (a class: picklable, named in stats)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len

  def __call__(self, i):
    start = int(i) * self._seq_len
    w = np.asarray(self._tokens[start:start + self._seq_len + 1], np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}


class _ProcessRows:
  """Global batch of window indices [A*B*P] -> this process's windows {inputs, targets}
  [A, B, T] (or [B, T] without accumulation)."""

  def __init__(self, window: _Window, *, batch_size: int, shard_index: int, shard_count: int,
               accum_steps: int | None):
    self._window = window
    self._b, self._p, self._n = batch_size, shard_index, shard_count
    self._a = accum_steps

  def __call__(self, idx):
    idx = np.asarray(idx).reshape(self._a or 1, self._b * self._n)
    mine = idx[:, self._p * self._b:(self._p + 1) * self._b].reshape(-1)
    rows = [self._window(i) for i in mine]
    out = {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets")}
    shape = ((self._a,) if self._a is not None else ()) + (self._b, -1)
    return {k: v.reshape(shape) for k, v in out.items()}


def make_lm_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int = 0,
                    shuffle: bool = True, num_epochs: int | None = None,
                    accum_steps: int | None = None, shard_index: int = 0,
                    shard_count: int = 1, drop_remainder: bool = True,
                    num_threads: int = 1, prefetch_buffer_size: int = 4) -> grain.IterDataset:
  """Batches of packed windows of `tokens`, as a grain IterDataset.

  Elements: {"inputs": int32 [B, T], "targets": int32 [B, T]} with B = batch_size, T = seq_len;
  with accum_steps=A, [A, B, T] (A consecutive micro-batches stacked, as the train step wants).
  num_epochs=None repeats forever (reshuffled each epoch). `iter(ds)` gives a
  `grain.DatasetIterator`; see `iterator_state` / `restore_iterator_state`.
  """
  tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
  if tokens.ndim != 1:
    raise ValueError(f"tokens: expected a 1-D token array, got shape {tokens.shape}")
  for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("shard_count", shard_count)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}: must be a positive int, got {v!r}")
  if accum_steps is not None and accum_steps < 1:
    raise ValueError(f"accum_steps: must be a positive int or None, got {accum_steps!r}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: must be in [0, shard_count={shard_count}), got {shard_index}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs: must be >= 1 or None, got {num_epochs}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed: must be in [0, 2**32), got {seed}")
  n = num_windows(tokens.size, seq_len)
  per_batch = batch_size * shard_count * (accum_steps or 1)   # windows per global step
  if n < per_batch:
    raise ValueError(f"tokens: {tokens.size} tokens give {n} windows of seq_len+1="
                     f"{seq_len + 1}, fewer than one global batch ({per_batch}); use a bigger "
                     "corpus or smaller seq_len/batch_size")
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  # Always whole global batches (a partial one cannot be split evenly over processes).
  del drop_remainder
  ds = ds.batch(per_batch, drop_remainder=True)
  ds = ds.map(_ProcessRows(_Window(tokens, seq_len), batch_size=batch_size,
                           shard_index=shard_index, shard_count=shard_count,
                           accum_steps=accum_steps))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch_buffer_size))


def make_eval_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                      shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """One unshuffled pass over the windows of `tokens` (full batches only): a fixed val set."""
  return make_lm_dataset(tokens, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                         num_epochs=1, shard_index=shard_index, shard_count=shard_count,
                         drop_remainder=True)


def iterator_state(iterator) -> dict[str, Any]:
  """The iterator's position, a small JSON-serializable dict (e.g. {"next_index": 12})."""
  return iterator.get_state()


def iterator_state_to_bytes(iterator) -> bytes:
  """`iterator_state` as UTF-8 JSON bytes (for orbax, or any file)."""
  return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(iterator, state: dict[str, Any] | bytes | str) -> None:
  """Moves a freshly built iterator (same dataset arguments) to a saved position."""
  if isinstance(state, (bytes, bytearray)):
    state = state.decode("utf-8")
  if isinstance(state, str):
    state = json.loads(state)
  if not isinstance(state, dict):
    raise ValueError(f"state: expected a dict, JSON str or bytes, got {type(state).__name__}")
  iterator.set_state(state)
