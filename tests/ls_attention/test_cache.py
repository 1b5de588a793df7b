"""Decode cache: ring buffer for local KV heads, full cache for global; decode == forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ls_attention import init_ls_cache, kv_memory_ratio, ls_attention, ls_cache_attend
from ls_attention.cache import num_ring_kv_heads
from tests.ls_attention.helpers import assert_close, qkv

TOL = 2e-5

# (b, t, h, kvh, d, window, num_local_heads, prefill): t/window >= 4 ring wraps; GQA where
# one KV head serves local and global query heads (5 local of 6, G=3); MQA; all-global;
# all-local; window > t (ring = whole cache).
CASES = [
    (2, 40, 6, 2, 8, 7, 5, 9),
    (1, 33, 4, 4, 8, 3, 3, 1),
    (2, 26, 4, 1, 8, 4, 2, 5),
    (1, 20, 4, 2, 8, 5, 0, 4),
    (1, 24, 2, 2, 8, 5, 2, 6),
    (1, 12, 2, 1, 8, 50, 1, 3),
]


def _cache(b, t, h, kvh, d, w, nl):
  return init_ls_cache(b, t, num_heads=h, num_kv_heads=kvh, head_dim=d, num_local_heads=nl,
                       window=w)


@pytest.mark.parametrize("case", CASES)
def test_decode_equals_full_forward_token_by_token(case):
  b, t, h, kvh, d, w, nl, pre = case
  q, k, v = qkv(sum(case), b, t, h, kvh, d)
  start_B = jnp.array([0, 3])[:b]  # row 1 is left-padded by 3 slots
  full = ls_attention(q, k, v, num_local_heads=nl, window=w, implementation="reference",
                      start_B=start_B)
  attend = functools.partial(ls_cache_attend, num_local_heads=nl, window=w, start_B=start_B)
  cache = _cache(b, t, h, kvh, d, w, nl)
  out, cache = jax.jit(attend)(q[:, :pre], k[:, :pre], v[:, :pre], cache, index=0)
  assert_close(out, full[:, :pre], TOL, "prefill")
  step = jax.jit(attend)
  for i in range(pre, t):
    out, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache, index=i)
    assert_close(out, full[:, i:i + 1], TOL, f"decode step at slot {i}")


def test_chunked_prefill_with_wraps_and_stats():
  """Prefill in chunks longer than the window (the ring is overwritten inside a chunk)."""
  b, t, h, kvh, d, w, nl = 2, 36, 6, 2, 8, 5, 5
  q, k, v = qkv(1, b, t, h, kvh, d)
  start_B = jnp.array([2, 0])
  full, fs = ls_attention(q, k, v, num_local_heads=nl, window=w, implementation="reference",
                          start_B=start_B, return_stats=True)
  attend = jax.jit(functools.partial(ls_cache_attend, num_local_heads=nl, window=w,
                                     start_B=start_B, return_stats=True))
  cache = _cache(b, t, h, kvh, d, w, nl)
  outs = []
  for lo, hi in ((0, 13), (13, 25), (25, 36)):
    out, cache, stats = attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache, index=lo)
    outs.append(out)
  assert_close(jnp.concatenate(outs, 1), full, TOL, "chunked prefill")
  # stats of a whole-sequence prefill equal the op's stats
  _, _, stats = attend(q, k, v, _cache(b, t, h, kvh, d, w, nl), index=0)
  for key in fs:
    assert_close(stats[key], fs[key], 1e-4, key)


def test_ring_holds_exactly_window_entries_and_memory_ratio():
  h, kvh, d, w, nl, t = 12, 12, 8, 100, 11, 4096
  cache = _cache(1, t, h, kvh, d, w, nl)
  assert cache.ring_k_BxRxKrxD.shape == (1, w, 11, d)
  assert cache.full_k_BxSxKfxD.shape == (1, t, 1, d)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  mhsa_bytes = 2 * t * h * d * 4
  ratio = kv_memory_ratio(h, nl, w, t)
  assert ratio == pytest.approx((nl * w + (h - nl) * t) / (h * t))
  assert nbytes / mhsa_bytes == pytest.approx(ratio)
  # GQA: a KV head shared by local and global query heads is kept in full.
  assert num_ring_kv_heads(12, 4, 11) == 3
  assert kv_memory_ratio(12, 11, 100, 4096, num_kv_heads=4) == pytest.approx(
      (3 * 100 + 1 * 4096) / (4 * 4096))
  assert kv_memory_ratio(12, 0, 100, 4096) == 1.0


def test_cache_validates_arguments():
  with pytest.raises(ValueError, match="window"):
    init_ls_cache(1, 8, num_heads=4, num_kv_heads=2, head_dim=8, num_local_heads=2, window=0)
  with pytest.raises(ValueError, match="num_local_heads"):
    init_ls_cache(1, 8, num_heads=4, num_kv_heads=2, head_dim=8, num_local_heads=5, window=2)
