"""Decode KV cache for LS-attention: a ring buffer for local heads, a full cache for global.

A local query at slot i only sees slots (i - window, i], so its KV heads need only the last
`window` entries: slot s lives at ring position s % R with R = min(window, max_len).
Global heads keep the full [max_len] cache, exactly as MHSA does. At context T the KV memory is
(n_ring_kv * R + n_full_kv * T) / (KVH * T) of an MHSA cache, i.e.
(n_local * window + n_global * T) / (H * T) without GQA (`kv_memory_ratio`).

GQA choice: KV head j serves query heads [j*G, (j+1)*G). It goes to the ring only if *all* of
its query heads are local (j < num_local_heads // G); a KV head shared by local and global
query heads keeps the full cache (the global heads need all of it) and its local query heads
read that full cache through the window mask. Exact either way; only memory differs.

Slot convention (common/attention.py): the T new tokens occupy slots [index, index + T); row b
is valid from slot start_B[b] (left padding). Slots are absolute, never reset, so the ring
wraps as often as needed: the decode step equals the full forward at every position.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from ls_attention import ops
from ls_attention.reference import MASK_VALUE


@flax.struct.dataclass
class LSCache:
  ring_k_BxRxKrxD: jax.Array | None  # KV heads [0, Kr): all their query heads are local
  ring_v_BxRxKrxD: jax.Array | None
  full_k_BxSxKfxD: jax.Array | None  # KV heads [Kr, KVH): serve at least one global head
  full_v_BxSxKfxD: jax.Array | None


def num_ring_kv_heads(num_heads: int, num_kv_heads: int, num_local_heads: int) -> int:
  """KV heads whose query heads are all local (they live in the ring buffer)."""
  return num_local_heads // (num_heads // num_kv_heads)


def kv_memory_ratio(num_heads: int, num_local_heads: int, window: int, context_len: int,
                    num_kv_heads: int | None = None) -> float:
  """KV-cache bytes of LS-attention / bytes of an MHSA cache at context `context_len`."""
  kvh = num_kv_heads or num_heads
  kr = num_ring_kv_heads(num_heads, kvh, num_local_heads)
  ring = min(window, context_len)
  return (kr * ring + (kvh - kr) * context_len) / (kvh * context_len)


def init_ls_cache(batch_size: int, max_len: int, *, num_heads: int, num_kv_heads: int,
                  head_dim: int, num_local_heads: int, window: int, dtype=jnp.float32) -> LSCache:
  ops.validate((batch_size, 1, num_heads, head_dim), (batch_size, 1, num_kv_heads, head_dim),
               (batch_size, 1, num_kv_heads, head_dim), num_local_heads, window)
  kr = num_ring_kv_heads(num_heads, num_kv_heads, num_local_heads)
  kf = num_kv_heads - kr
  ring = min(window, max_len)
  zeros = lambda n, k: jnp.zeros((batch_size, n, k, head_dim), dtype) if k else None
  return LSCache(zeros(ring, kr), zeros(ring, kr), zeros(max_len, kf), zeros(max_len, kf))


def _write_ring(ring_BxRxKxD, new_BxTxKxD, index):
  """Writes slots [index, index + T) at ring positions slot % R (only the last R matter)."""
  r, t = ring_BxRxKxD.shape[1], new_BxTxKxD.shape[1]
  new_BxTxKxD = new_BxTxKxD.astype(ring_BxRxKxD.dtype)
  if t == 1:  # decode: an in-place dynamic_update_slice
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(ring_BxRxKxD, new_BxTxKxD,
                                        (zero, jnp.asarray(index % r, jnp.int32), zero, zero))
  if t > r:
    new_BxTxKxD, index = new_BxTxKxD[:, t - r:], index + (t - r)
    t = r
  pos = (index + jnp.arange(t)) % r  # distinct since t <= r
  return ring_BxRxKxD.at[:, pos].set(new_BxTxKxD)


def _dense_slots(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_slots_T, start_B, *, num_local_heads,
                 window, logits_soft_cap, need_stats):
  """Dense attention of T queries (at q_slots_T) over the full cache (key slot = position).

  Heads [0, num_local_heads) of this group are local (window mask), the rest causal.
  """
  b, t, h, d = q_BxTxHxD.shape
  s_len, kvh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  g = h // kvh
  q = q_BxTxHxD.reshape(b, t, kvh, g, d)
  s = jnp.einsum("btKgd,bsKd->bKgts", q, k_BxSxKxD.astype(q.dtype),
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  k_slots = jnp.arange(s_len)
  causal_TxS = k_slots[None, :] <= q_slots_T[:, None]
  local_TxS = causal_TxS & (k_slots[None, :] > q_slots_T[:, None] - window)
  is_local_KxG = (jnp.arange(h) < num_local_heads).reshape(kvh, g)
  vis = jnp.where(is_local_KxG[:, :, None, None], local_TxS, causal_TxS)  # [K,G,T,S]
  valid_BxS = k_slots[None, :] >= jnp.maximum(start_B, 0)[:, None]
  mask = vis[None] & valid_BxS[:, None, None, None, :]
  sm = jnp.where(mask, s, MASK_VALUE)
  m = jnp.max(sm, axis=-1, keepdims=True)
  p = jnp.exp(sm - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bKgts,bsKd->bKgtd", (p / l).astype(q.dtype), v_BxSxKxD.astype(q.dtype),
                 preferred_element_type=jnp.float32)
  row_valid_BxT = q_slots_T[None, :] >= jnp.maximum(start_B, 0)[:, None]
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  out = jnp.where(row_valid_BxT[:, :, None, None], out, 0.0).astype(q_BxTxHxD.dtype)
  if not need_stats:
    return out, None, None
  lse = (m + jnp.log(l))[..., 0].reshape(b, h, t)
  maxabs = jnp.max(jnp.where(mask, jnp.abs(s), 0.0), axis=-1).reshape(b, h, t)
  return out, lse, maxabs


def ls_cache_attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, cache: LSCache, *, index, num_local_heads: int,
                    window: int, start_B=None, logits_soft_cap: float | None = None,
                    return_stats: bool = False, implementation: str = "auto"):
  """Writes the T new keys/values at slots [index, index+T) and attends the T new queries.

  Works for prefill (T > 1, any index) and single-token decode (T = 1).
  Returns (out [B,T,H,D], new_cache) or (out, new_cache, stats) with the op's stats keys.
  """
  ops.validate(q_BxTxHxD.shape, k_BxTxKxD.shape, v_BxTxKxD.shape, num_local_heads, window,
               logits_soft_cap)
  b, t, h, _ = q_BxTxHxD.shape
  kvh = k_BxTxKxD.shape[2]
  g = h // kvh
  kr = num_ring_kv_heads(h, kvh, num_local_heads)
  hr = kr * g  # query heads served by the ring
  index = jnp.asarray(index, jnp.int32)
  start_B = (jnp.zeros((b,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32))
  outs, new = [], {}
  ring_stats = full = None
  if kr:
    r = cache.ring_k_BxRxKrxD.shape[1]
    # Unroll the ring into slot order: position j holds slot index - R + j (j < R).
    order = (index + jnp.arange(r)) % r
    keys = jnp.concatenate([cache.ring_k_BxRxKrxD[:, order].astype(q_BxTxHxD.dtype),
                            k_BxTxKxD[:, :, :kr].astype(q_BxTxHxD.dtype)], axis=1)
    values = jnp.concatenate([cache.ring_v_BxRxKrxD[:, order].astype(q_BxTxHxD.dtype),
                              v_BxTxKxD[:, :, :kr].astype(q_BxTxHxD.dtype)], axis=1)
    # Key position j has slot index - R + j; slots before start_B (or < 0) are masked.
    kv_start_B = jnp.maximum(start_B, 0) - index + r
    res = ops.ls_attention(q_BxTxHxD[:, :, :hr], keys, values, num_local_heads=hr,
                           window=window, implementation=implementation,
                           logits_soft_cap=logits_soft_cap, return_stats=return_stats,
                           start_B=kv_start_B)
    out_r, ring_stats = res if return_stats else (res, None)
    outs.append(out_r)
    new["ring_k_BxRxKrxD"] = _write_ring(cache.ring_k_BxRxKrxD, k_BxTxKxD[:, :, :kr], index)
    new["ring_v_BxRxKrxD"] = _write_ring(cache.ring_v_BxRxKrxD, v_BxTxKxD[:, :, :kr], index)
  if kr < kvh:
    zero = jnp.zeros((), jnp.int32)
    at = (zero, index, zero, zero)
    fk = jax.lax.dynamic_update_slice(
        cache.full_k_BxSxKfxD, k_BxTxKxD[:, :, kr:].astype(cache.full_k_BxSxKfxD.dtype), at)
    fv = jax.lax.dynamic_update_slice(
        cache.full_v_BxSxKfxD, v_BxTxKxD[:, :, kr:].astype(cache.full_v_BxSxKfxD.dtype), at)
    out_f, lse, maxabs = _dense_slots(
        q_BxTxHxD[:, :, hr:], fk, fv, index + jnp.arange(t), start_B,
        num_local_heads=num_local_heads - hr, window=window, logits_soft_cap=logits_soft_cap,
        need_stats=return_stats)
    outs.append(out_f)
    new["full_k_BxSxKfxD"], new["full_v_BxSxKfxD"] = fk, fv
    full = (lse, maxabs)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  new_cache = cache.replace(**new)
  if not return_stats:
    return out, new_cache
  return out, new_cache, _merge_stats(ring_stats, full, hr, num_local_heads, h, index, t,
                                      start_B)


def _merge_stats(ring_stats, full, hr, num_local_heads, h, index, t, start_B):
  """Combines the ring group's scalar stats with per-row stats of the full-cache heads."""
  row_valid_BxT = (index + jnp.arange(t))[None, :] >= jnp.maximum(start_B, 0)[:, None]
  n_rows = jnp.maximum(jnp.sum(row_valid_BxT), 1)
  zero = jnp.zeros((), jnp.float32)
  groups = {}  # name -> list of (max_abs, mean_lse, n_heads)
  if ring_stats is not None:
    groups["local"] = [(ring_stats["local_max_abs_logit"], ring_stats["local_mean_lse"], hr)]
  if full is not None:
    lse, maxabs = full
    valid = row_valid_BxT[:, None, :]
    for name, lo, hi in (("local", 0, num_local_heads - hr), ("global", num_local_heads - hr,
                                                                h - hr)):
      if hi > lo:
        mx = jnp.max(jnp.where(valid, maxabs[:, lo:hi], 0.0))
        mean = jnp.sum(jnp.where(valid, lse[:, lo:hi], 0.0)) / (n_rows * (hi - lo))
        groups.setdefault(name, []).append((mx, mean, hi - lo))
  stats = {}
  for name in ("local", "global"):
    parts = groups.get(name, [])
    n = sum(p[2] for p in parts)
    stats[f"{name}_max_abs_logit"] = (jnp.max(jnp.stack([p[0] for p in parts]))
                                      if parts else zero)
    stats[f"{name}_mean_lse"] = (sum(p[1] * p[2] for p in parts) / n if parts else zero)
  return stats


def attend(q, k, v, *, cache: "LSCache | None", index, start_B, block_sizes, collect_stats: bool,
           **op_kwargs):
  """The layers' one call into LS-attention: the op without a cache (training, prefill of
  a fresh sequence), the sliding-window cache with one. -> (out, stats or None, new cache)."""
  if cache is None:
    res = ops.ls_attention(q, k, v, start_B=start_B, block_sizes=block_sizes,
                           return_stats=collect_stats, **op_kwargs)
    out, stats = res if collect_stats else (res, None)
    return out, stats, None
  res = ls_cache_attend(q, k, v, cache, index=index, start_B=start_B,
                        return_stats=collect_stats, **op_kwargs)
  return res[0], (res[2] if collect_stats else None), res[1]
