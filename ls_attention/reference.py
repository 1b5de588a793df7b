"""Dense reference LS-attention: the readable definition the fast paths are tested against.

LS-attention (arXiv 2505.15548, Sec. 3): heads [0, num_local_heads) are *local* and see a
causal sliding window, heads [num_local_heads, H) are *global* and see full causal attention.
Query i of a local head sees key j iff `i - window < j <= i`, i.e. the author's mask
`tril(ones, 0) * (1 - tril(ones, -window))`. Scale 1/sqrt(D); optional Gemma-2 style logit
soft-cap `cap * tanh(s / cap)` on the pre-softmax logits. Everything in float32, O(T^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite: a fully masked (left-padding) query row gives no NaN.


def ls_mask(t: int, s: int, num_heads: int, num_local_heads: int, window: int,
            q_offset: int = 0):
  """[H, T, S] bool visibility; query i sits at key position i + q_offset."""
  qpos_T = jnp.arange(t)[:, None] + q_offset
  kpos_S = jnp.arange(s)[None, :]
  causal_TxS = kpos_S <= qpos_T
  local_TxS = causal_TxS & (kpos_S > qpos_T - window)
  is_local_H = (jnp.arange(num_heads) < num_local_heads)[:, None, None]
  return jnp.where(is_local_H, local_TxS[None], causal_TxS[None])


def group_stats(logits_BxHxTxS, lse_BxHxT, mask_BxHxTxS, num_local_heads: int):
  """The paper's instability diagnostic per head group (local, global).

  max |pre-softmax logit| over visible entries and mean per-row log-sum-exp over rows that
  see at least one key; a group with no heads reports 0.
  """
  h = logits_BxHxTxS.shape[1]
  stats = {}
  for name, lo, hi in (("local", 0, num_local_heads), ("global", num_local_heads, h)):
    if hi <= lo:
      stats[f"{name}_max_abs_logit"] = jnp.zeros((), jnp.float32)
      stats[f"{name}_mean_lse"] = jnp.zeros((), jnp.float32)
      continue
    m = mask_BxHxTxS[:, lo:hi]
    row_valid = jnp.any(m, axis=-1)
    stats[f"{name}_max_abs_logit"] = jnp.max(
        jnp.where(m, jnp.abs(logits_BxHxTxS[:, lo:hi]), 0.0))
    stats[f"{name}_mean_lse"] = jnp.sum(jnp.where(row_valid, lse_BxHxT[:, lo:hi], 0.0)) / (
        jnp.maximum(jnp.sum(row_valid), 1))
  return stats


def ls_attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, num_local_heads: int,
                           window: int, logits_soft_cap: float | None = None,
                           return_stats: bool = False, start_B=None):
  """Dense masked softmax LS-attention in float32 (GQA: query head h uses kv head h // G).

  `start_B` (optional, int [B]): keys at positions < start_B[b] are masked (left padding).
  """
  b, t, h, d = q_BxTxHxD.shape
  s, kvh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  g = h // kvh
  q = q_BxTxHxD.astype(jnp.float32)
  k = jnp.repeat(k_BxSxKxD.astype(jnp.float32), g, axis=2)
  v = jnp.repeat(v_BxSxKxD.astype(jnp.float32), g, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k,
                      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  mask = jnp.broadcast_to(ls_mask(t, s, h, num_local_heads, window, q_offset=s - t)[None],
                          (b, h, t, s))
  if start_B is not None:
    mask = mask & (jnp.arange(s)[None, :] >= jnp.asarray(start_B)[:, None])[:, None, None, :]
  masked = jnp.where(mask, logits, MASK_VALUE)
  lse = jax.nn.logsumexp(masked, axis=-1)
  probs = jnp.exp(masked - lse[..., None])
  out = jnp.einsum("bhts,bshd->bthd", probs, v, precision=jax.lax.Precision.HIGHEST)
  # A row that sees no key at all (left padding before start_B) outputs 0.
  out = jnp.where(jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None], out, 0.0)
  out = out.astype(q_BxTxHxD.dtype)
  if not return_stats:
    return out
  return out, group_stats(logits, lse, mask, num_local_heads)
