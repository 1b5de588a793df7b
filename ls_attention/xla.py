"""Blocked, sub-quadratic LS-attention in plain XLA: the default off-accelerator path.

Two building blocks, both exact (no online softmax: every query block sees all of its keys in
one go, so a plain masked softmax per block is the true softmax):

* `band_attention` (local heads, small window): queries are cut into chunks of C rows; chunk n
  attends to its own chunk and the ceil((window-1)/C) chunks before it. Only
  T * (n_prev+1) * C scores exist, O(T * window) instead of O(T^2). Fully vectorised (one
  einsum over all chunks), which is what makes it fast on CPU.
* `prefix_attention` (global heads, or local heads whose window is large vs T): queries are cut
  into a few row blocks; block [a, e) attends to keys [lo, e) only (lo = 0 for causal heads,
  a - window + 1 for local ones), so the masked upper triangle is mostly skipped:
  T^2 (nb+1) / (2 nb) scores for nb blocks instead of T^2.

Both take queries aligned to the *end* of the keys (query i sits at key position i + S - T),
which is what a prefill after earlier chunks needs, and an optional `start_B` masking keys at
positions < start_B[b] (left padding). Softmax in float32, probabilities cast to v.dtype for
the PV product (as common.attention.dense_attention does).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ls_attention.reference import MASK_VALUE


def _cap(s, logits_soft_cap):
  # Gemma-2 style logit soft-cap: cap * tanh(s / cap).
  if logits_soft_cap is None:
    return s
  return logits_soft_cap * jnp.tanh(s / logits_soft_cap)


def _masked_softmax_pv(s, mask, v_win, pv_spec, need_stats):
  """Row softmax of masked logits s[..., S], then P @ V. Returns (o_unnormalised/l, lse, maxabs)."""
  sm = jnp.where(mask, s, MASK_VALUE)
  m = jnp.max(sm, axis=-1, keepdims=True)
  p = jnp.exp(sm - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum(pv_spec, p.astype(v_win.dtype), v_win, preferred_element_type=jnp.float32)
  lse = maxabs = None
  if need_stats:
    lse = (m + jnp.log(l))[..., 0]
    maxabs = jnp.max(jnp.where(mask, jnp.abs(s), 0.0), axis=-1)
  return o, l, lse, maxabs


def band_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, window: int, chunk: int,
                   logits_soft_cap=None, start_B=None, need_stats=False):
  """Sliding-window attention touching only O(T * window) scores. H = K * G (aligned GQA).

  Returns out [B,T,H,D] (q.dtype) and, if need_stats, lse and max|logit| per row [B,H,T].
  """
  b, t, h, d = q_BxTxHxD.shape
  s_len, kvh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  g = h // kvh
  if s_len != t:  # queries aligned to the end of the keys: pad queries at the front
    q_BxTxHxD = jnp.pad(q_BxTxHxD, ((0, 0), (s_len - t, 0), (0, 0), (0, 0)))
  tq = s_len
  c = chunk
  n_prev = -(-(window - 1) // c)
  n = -(-tq // c)
  tp = n * c
  front = n_prev * c
  pad = ((0, 0), (front, tp - tq), (0, 0), (0, 0))
  kp, vp = jnp.pad(k_BxSxKxD, pad), jnp.pad(v_BxSxKxD, pad)
  # Keys of chunk n = chunks n - n_prev .. n: (n_prev + 1) shifted views, concatenated.
  k_BxNxWxKxD = jnp.concatenate(
      [kp[:, p * c:p * c + tp].reshape(b, n, c, kvh, d) for p in range(n_prev + 1)], axis=2)
  v_BxNxWxKxD = jnp.concatenate(
      [vp[:, p * c:p * c + tp].reshape(b, n, c, kvh, d) for p in range(n_prev + 1)], axis=2)
  q_BxNxCxKxGxD = jnp.pad(q_BxTxHxD, ((0, 0), (0, tp - tq), (0, 0), (0, 0))).reshape(
      b, n, c, kvh, g, d)
  s = jnp.einsum("bncKgd,bnwKd->bnKgcw", q_BxNxCxKxGxD, k_BxNxWxKxD,
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
  s = _cap(s, logits_soft_cap)
  w_len = (n_prev + 1) * c
  # query pos = n*c + ci, key pos = n*c + wi - front; visible iff 0 <= qpos - kpos < window.
  rel_CxW = np.arange(c)[:, None] - np.arange(w_len)[None, :] + front
  band_CxW = (rel_CxW >= 0) & (rel_CxW < window)
  kpos_NxW = np.arange(n)[:, None] * c + np.arange(w_len)[None, :] - front
  if start_B is None:
    valid = jnp.asarray(kpos_NxW >= 0)[None]  # [1, N, W]
  else:
    lo_B = jnp.maximum(jnp.asarray(start_B, jnp.int32), 0)
    valid = jnp.asarray(kpos_NxW)[None] >= lo_B[:, None, None]  # [B, N, W]
  mask = jnp.asarray(band_CxW)[None, None, None, None] & valid[:, :, None, None, None, :]
  o, l, lse, maxabs = _masked_softmax_pv(s, mask, v_BxNxWxKxD, "bnKgcw,bnwKd->bnKgcd",
                                         need_stats)
  o = o / l
  out = o.transpose(0, 1, 4, 2, 3, 5).reshape(b, tp, h, d)[:, tq - t:tq]
  if start_B is not None:  # rows that see no key (left padding) output 0, as in the reference
    out = jnp.where((np.arange(tq - t, tq)[None, :] >= lo_B[:, None])[:, :, None, None], out, 0)
  out = out.astype(q_BxTxHxD.dtype)
  if not need_stats:
    return out, None, None

  def rows(x_BxNxKxGxC):
    x = x_BxNxKxGxC.transpose(0, 2, 3, 1, 4).reshape(b, h, tp)[:, :, :tq]
    return x[:, :, tq - t:]

  return out, rows(lse), rows(maxabs)


def prefix_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, window: int | None, num_blocks: int,
                     logits_soft_cap=None, start_B=None, need_stats=False):
  """Causal (window=None) or windowed attention; row block [a, e) only sees keys [lo, e)."""
  b, t, h, d = q_BxTxHxD.shape
  s_len, kvh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  g = h // kvh
  off = s_len - t
  nb = max(1, min(num_blocks, t))
  edges = [round(i * t / nb) for i in range(nb + 1)]
  lo_B = None if start_B is None else jnp.maximum(jnp.asarray(start_B, jnp.int32), 0)
  outs, lses, maxabss = [], [], []
  for a, e in zip(edges[:-1], edges[1:]):
    if e <= a:
      continue
    k_hi = e + off
    k_lo = 0 if window is None else max(0, a + off - window + 1)
    qb = q_BxTxHxD[:, a:e].reshape(b, e - a, kvh, g, d)
    s = jnp.einsum("bqKgd,bsKd->bKgqs", qb, k_BxSxKxD[:, k_lo:k_hi],
                   preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
    s = _cap(s, logits_soft_cap)
    qpos = np.arange(a, e)[:, None] + off
    kpos = np.arange(k_lo, k_hi)[None, :]
    vis = kpos <= qpos
    if window is not None:
      vis &= kpos > qpos - window
    mask = jnp.asarray(vis)[None, None, None]
    if lo_B is not None:
      mask = mask & (jnp.asarray(kpos[0])[None, :] >= lo_B[:, None])[:, None, None, None, :]
    o, l, lse, maxabs = _masked_softmax_pv(s, mask, v_BxSxKxD[:, k_lo:k_hi],
                                           "bKgqs,bsKd->bqKgd", need_stats)
    outs.append((o / l.transpose(0, 3, 1, 2, 4)).reshape(b, e - a, h, d))
    if need_stats:
      lses.append(lse.reshape(b, h, e - a))
      maxabss.append(maxabs.reshape(b, h, e - a))
  out = jnp.concatenate(outs, axis=1)
  if lo_B is not None:  # rows that see no key (left padding) output 0, as in the reference
    out = jnp.where((np.arange(off, s_len)[None, :] >= lo_B[:, None])[:, :, None, None], out, 0)
  out = out.astype(q_BxTxHxD.dtype)
  if not need_stats:
    return out, None, None
  return out, jnp.concatenate(lses, axis=2), jnp.concatenate(maxabss, axis=2)
