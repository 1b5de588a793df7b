"""Dense reference for the windowed attention kernels: the readable definition.

Materializes the full T x T score matrix in float32, so use it for tests only.
The mask is the LS-attention local mask (arXiv 2505.15548, author's code):
`tril(ones, 0) * (1 - tril(ones, -window))`, i.e. query i sees key j iff
`i - window < j <= i`; `window=None` is plain causal attention. With
`num_local_heads`, only heads [0, num_local_heads) are windowed (the rest are
causal), and `start_B` masks keys before start_B[b] (left padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def window_mask(t: int, window: int | None) -> jax.Array:
  """Boolean [T, T] mask: entry (i, j) is True iff query i sees key j."""
  i_Tx1 = jnp.arange(t)[:, None]
  j_1xT = jnp.arange(t)[None, :]
  visible_TxT = j_1xT <= i_Tx1
  if window is not None:
    visible_TxT &= j_1xT > i_Tx1 - window
  return visible_TxT


def reference(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    start_B: jax.Array | None = None,
    *,
    window: int | None,
    num_local_heads: int | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dense masked softmax attention in float32.

  Same contract as `windowed_flash_attention(..., return_stats=True)`, except
  that `out` stays float32 so that tests can measure the kernel's own rounding.

  Returns:
    out_BxTxHxD (float32), lse_BxHxT (float32), max_abs_logit_BxHxT (float32):
    the log-sum-exp of the visible logits and the max |logit| over visible keys
    (logits after the optional soft-cap `cap * tanh(s / cap)`). A row that sees
    no key (left padding) has out 0, lse -inf and max_abs_logit 0.
  """
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxTxKxD.shape[2]
  group = h // kvh
  # GQA: query head h reads kv head h // group.
  k_BxTxHxD = jnp.repeat(k_BxTxKxD.astype(jnp.float32), group, axis=2)
  v_BxTxHxD = jnp.repeat(v_BxTxKxD.astype(jnp.float32), group, axis=2)
  q_BxTxHxD = q_BxTxHxD.astype(jnp.float32)
  s_BxHxTxT = jnp.einsum(
      "bqhd,bkhd->bhqk", q_BxTxHxD, k_BxTxHxD,
      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
  if logits_soft_cap is not None:
    s_BxHxTxT = logits_soft_cap * jnp.tanh(s_BxHxTxT / logits_soft_cap)
  nl = h if num_local_heads is None else num_local_heads
  is_local_H = jnp.arange(h) < nl
  visible_BxHxTxT = jnp.where(is_local_H[None, :, None, None],
                              window_mask(t, window)[None, None],
                              window_mask(t, None)[None, None])
  if start_B is not None:
    key_ok_BxT = jnp.arange(t)[None, :] >= jnp.asarray(start_B)[:, None]
    visible_BxHxTxT = visible_BxHxTxT & key_ok_BxT[:, None, None, :]
  visible_BxHxTxT = jnp.broadcast_to(visible_BxHxTxT, s_BxHxTxT.shape)
  max_abs_BxHxT = jnp.max(
      jnp.where(visible_BxHxTxT, jnp.abs(s_BxHxTxT), 0.0), -1)
  s_BxHxTxT = jnp.where(visible_BxHxTxT, s_BxHxTxT, -jnp.inf)
  lse_BxHxT = jax.nn.logsumexp(s_BxHxTxT, axis=-1)
  seen_BxHxT = jnp.any(visible_BxHxTxT, axis=-1)
  p_BxHxTxT = jnp.where(
      visible_BxHxTxT,
      jnp.exp(s_BxHxTxT - jnp.where(seen_BxHxT, lse_BxHxT, 0.0)[..., None]),
      0.0)
  out_BxTxHxD = jnp.einsum(
      "bhqk,bkhd->bqhd", p_BxHxTxT, v_BxTxHxD,
      precision=jax.lax.Precision.HIGHEST)
  return out_BxTxHxD, lse_BxHxT, max_abs_BxHxT
