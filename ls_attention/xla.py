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

import functools
import math
from typing import NamedTuple

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


class _BandGeom(NamedTuple):
  c: int       # query chunk
  n_prev: int  # previous chunks a chunk reads
  n: int       # chunks
  tp: int      # padded length n * c
  front: int   # key padding in front: n_prev * c
  w_len: int   # keys per chunk: (n_prev + 1) * c


def _band_geom(tq: int, window: int, chunk: int) -> _BandGeom:
  n_prev = -(-(window - 1) // chunk)
  n = -(-tq // chunk)
  return _BandGeom(chunk, n_prev, n, n * chunk, n_prev * chunk, (n_prev + 1) * chunk)


def _windows(x_BxSxKxD, gm: _BandGeom):
  """[B,S,K,D] -> [B,N,W,K,D]: keys of chunk n = chunks n - n_prev .. n (shifted views)."""
  b, s_len, kvh, d = x_BxSxKxD.shape
  xp = jnp.pad(x_BxSxKxD, ((0, 0), (gm.front, gm.tp - s_len), (0, 0), (0, 0)))
  return jnp.concatenate([xp[:, p * gm.c:p * gm.c + gm.tp].reshape(b, gm.n, gm.c, kvh, d)
                          for p in range(gm.n_prev + 1)], axis=2)


def _unwindows(x_BxNxWxKxD, gm: _BandGeom, s_len: int):
  """Adjoint of _windows: sums every view's contribution back onto [B,S,K,D]."""
  b, _, _, kvh, d = x_BxNxWxKxD.shape
  total = 0.0
  for p in range(gm.n_prev + 1):
    piece = x_BxNxWxKxD[:, :, p * gm.c:(p + 1) * gm.c].reshape(b, gm.tp, kvh, d)
    total = total + jnp.pad(piece, ((0, 0), (p * gm.c, (gm.n_prev - p) * gm.c), (0, 0), (0, 0)))
  return total[:, gm.front:gm.front + s_len]


def _band_mask(gm: _BandGeom, window: int, lo_B):
  """[B|1, N, 1, 1, C, W] visibility: 0 <= qpos - kpos < window and kpos >= lo_B."""
  # query pos = n*c + ci, key pos = n*c + wi - front.
  rel_CxW = np.arange(gm.c)[:, None] - np.arange(gm.w_len)[None, :] + gm.front
  band_CxW = (rel_CxW >= 0) & (rel_CxW < window)
  kpos_NxW = np.arange(gm.n)[:, None] * gm.c + np.arange(gm.w_len)[None, :] - gm.front
  if lo_B is None:
    valid = jnp.asarray(kpos_NxW >= 0)[None]  # [1, N, W]
  else:
    valid = jnp.asarray(kpos_NxW)[None] >= lo_B[:, None, None]  # [B, N, W]
  return jnp.asarray(band_CxW)[None, None, None, None] & valid[:, :, None, None, None, :]


def _chunk_q(x_BxTxHxD, gm: _BandGeom, kvh: int):
  b, t, h, d = x_BxTxHxD.shape
  return jnp.pad(x_BxTxHxD, ((0, 0), (0, gm.tp - t), (0, 0), (0, 0))).reshape(
      b, gm.n, gm.c, kvh, h // kvh, d)


def _unchunk(x_BxNxCxKxGxD, t: int):
  b, n, c, kvh, g, d = x_BxNxCxKxGxD.shape
  return x_BxNxCxKxGxD.reshape(b, n * c, kvh * g, d)[:, :t]


def _band_forward(window, chunk, cap, q, k, v, lo_B, need_stats):
  """Self-attention band (q and k both length S). Returns out [B,S,H,D], lse and max|s|
  in chunk layout [B,N,K,G,C]."""
  b, s_len, h, d = q.shape
  kvh = k.shape[2]
  gm = _band_geom(s_len, window, chunk)
  k_w, v_w = _windows(k, gm), _windows(v, gm)
  s = jnp.einsum("bncKgd,bnwKd->bnKgcw", _chunk_q(q, gm, kvh), k_w,
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
  s = _cap(s, cap)
  mask = _band_mask(gm, window, lo_B)
  o, l, lse, maxabs = _masked_softmax_pv(s, mask, v_w, "bnKgcw,bnwKd->bnKgcd", True)
  o = (o / l).transpose(0, 1, 4, 2, 3, 5)  # [B,N,C,K,G,D]
  out = _unchunk(o, s_len)
  if lo_B is not None:  # rows that see no key (left padding) output 0, as in the reference
    out = jnp.where((np.arange(s_len)[None, :] >= lo_B[:, None])[:, :, None, None], out, 0)
  return out.astype(q.dtype), lse, (maxabs if need_stats else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _band_core(window, chunk, cap, q, k, v, lo_B):
  return _band_forward(window, chunk, cap, q, k, v, lo_B, False)[0]


def _band_core_fwd(window, chunk, cap, q, k, v, lo_B):
  out, lse, _ = _band_forward(window, chunk, cap, q, k, v, lo_B, False)
  return out, (q, k, v, lo_B, out, lse)


def _band_core_bwd(window, chunk, cap, res, dout):
  """FlashAttention-2 style backward (Dao 2023, Alg. 2) on the band: P is recomputed from
  the saved log-sum-exp, dS = P * (dP - rowsum(dO * O)); soft-cap adds (1 - tanh^2)."""
  q, k, v, lo_B, out, lse = res
  b, s_len, h, d = q.shape
  kvh = k.shape[2]
  gm = _band_geom(s_len, window, chunk)
  scale = 1.0 / math.sqrt(d)
  q_c = _chunk_q(q, gm, kvh)
  k_w, v_w = _windows(k, gm), _windows(v, gm)
  s = jnp.einsum("bncKgd,bnwKd->bnKgcw", q_c, k_w, preferred_element_type=jnp.float32) * scale
  if cap is not None:
    tanh = jnp.tanh(s / cap)
    s = cap * tanh
  mask = _band_mask(gm, window, lo_B)
  p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
  do_c = _chunk_q(dout.astype(jnp.float32), gm, kvh)
  delta = jnp.sum(do_c * _chunk_q(out.astype(jnp.float32), gm, kvh), axis=-1)  # [B,N,C,K,G]
  dv_w = jnp.einsum("bnKgcw,bncKgd->bnwKd", p, do_c)
  dp = jnp.einsum("bncKgd,bnwKd->bnKgcw", do_c, v_w, preferred_element_type=jnp.float32)
  ds = p * (dp - delta.transpose(0, 1, 3, 4, 2)[..., None])
  if cap is not None:
    ds = ds * (1.0 - tanh * tanh)
  ds = ds * scale
  dq = _unchunk(jnp.einsum("bnKgcw,bnwKd->bncKgd", ds, k_w,
                           preferred_element_type=jnp.float32), s_len)
  dk_w = jnp.einsum("bnKgcw,bncKgd->bnwKd", ds, q_c, preferred_element_type=jnp.float32)
  dk, dv = _unwindows(dk_w, gm, s_len), _unwindows(dv_w, gm, s_len)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_band_core.defvjp(_band_core_fwd, _band_core_bwd)


def band_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, window: int, chunk: int,
                   logits_soft_cap=None, start_B=None, need_stats=False):
  """Sliding-window attention touching only O(T * window) scores. H = K * G (aligned GQA).

  Without stats it is a custom_vjp whose backward recomputes the band from the saved
  log-sum-exp (no T x W probabilities kept between forward and backward). Measured on the
  2-core CPU it is as fast as autodiff of `_band_forward` and needs ~10% less temporary
  memory (202 vs 225 MB at B=1, T=4096, 11 heads, D=64, w=100). Returns out [B,T,H,D] (q.dtype) and, if
  need_stats, lse and max|logit| per row [B,H,T].
  """
  b, t, h, d = q_BxTxHxD.shape
  s_len = k_BxSxKxD.shape[1]
  if s_len != t:  # queries aligned to the end of the keys: pad queries at the front
    q_BxTxHxD = jnp.pad(q_BxTxHxD, ((0, 0), (s_len - t, 0), (0, 0), (0, 0)))
  lo_B = None if start_B is None else jnp.maximum(jnp.asarray(start_B, jnp.int32), 0)
  if not need_stats:
    return _band_core(window, chunk, logits_soft_cap, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                      lo_B)[:, s_len - t:], None, None
  out, lse, maxabs = _band_forward(window, chunk, logits_soft_cap, q_BxTxHxD, k_BxSxKxD,
                                   v_BxSxKxD, lo_B, True)

  def rows(x_BxNxKxGxC):
    return x_BxNxKxGxC.transpose(0, 2, 3, 1, 4).reshape(b, h, -1)[:, :, s_len - t:s_len]

  return out[:, s_len - t:], rows(lse), rows(maxabs)


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
