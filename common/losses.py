"""Language-model losses: masked token cross-entropy and the z-loss, in float32.

Both are means over the tokens where mask_BxT > 0 (weights allowed); logits may be bf16 and are
upcast first, since log-sum-exp in bf16 loses the small differences the loss is made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(logits_BxTxV, targets_BxT=None, mask_BxT=None):
  if logits_BxTxV.ndim < 1:
    raise ValueError(f"logits: expected [..., V], got shape {logits_BxTxV.shape}")
  lead = logits_BxTxV.shape[:-1]
  if targets_BxT is not None and targets_BxT.shape != lead:
    raise ValueError(f"targets: shape {targets_BxT.shape} must equal logits.shape[:-1]={lead}")
  if mask_BxT is not None and mask_BxT.shape != lead:
    raise ValueError(f"mask: shape {mask_BxT.shape} must equal logits.shape[:-1]={lead}")


def _masked_mean(x_BxT, mask_BxT):
  if mask_BxT is None:
    return jnp.mean(x_BxT)
  w = mask_BxT.astype(jnp.float32)
  return jnp.sum(x_BxT * w) / jnp.maximum(jnp.sum(w), 1.0)


def token_cross_entropy(logits_BxTxV, targets_BxT):
  """Per-token -log softmax(logits)[target] (float32) and the per-token log-sum-exp."""
  logits = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  tgt_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse_BxT - tgt_BxT, lse_BxT


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT=None):
  """Mean token cross-entropy (nats, float32) over the masked tokens (all if mask is None)."""
  _check(logits_BxTxV, targets_BxT, mask_BxT)
  ce_BxT, _ = token_cross_entropy(logits_BxTxV, targets_BxT)
  return _masked_mean(ce_BxT, mask_BxT)


def z_loss(logits_BxTxV, coef: float = 1e-4, mask_BxT=None):
  """coef * mean(logsumexp(logits)^2): PaLM (Chowdhery et al. 2022, sec. 5) auxiliary loss.

  It pulls the softmax normalizer log Z toward 0, so output logits cannot drift upward
  together (one of the stabilizer baselines the LS-attention paper compares against).
  """
  _check(logits_BxTxV, None, mask_BxT)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV.astype(jnp.float32), axis=-1)
  return coef * _masked_mean(jnp.square(lse_BxT), mask_BxT)


def lm_loss(logits_BxTxV, targets_BxT, mask_BxT=None, *, z_loss_coef: float = 0.0):
  """cross_entropy + z_loss_coef * mean(lse^2), sharing one log-sum-exp. Returns (loss, aux).

  aux = {"ce": mean CE, "z_loss": mean(lse^2) (unscaled), "lse_mean": mean log Z}.
  """
  _check(logits_BxTxV, targets_BxT, mask_BxT)
  ce_BxT, lse_BxT = token_cross_entropy(logits_BxTxV, targets_BxT)
  ce = _masked_mean(ce_BxT, mask_BxT)
  zl = _masked_mean(jnp.square(lse_BxT), mask_BxT)
  aux = {"ce": ce, "z_loss": zl, "lse_mean": _masked_mean(lse_BxT, mask_BxT)}
  return ce + z_loss_coef * zl, aux


# ------------------------------------------------------------------ chunked over tokens ---
# The LM head applied chunk by chunk inside `lax.map`, each chunk under `jax.checkpoint`:
# only one [C, V] float32 logits block is alive at a time, forward and backward (the backward
# recomputes a chunk's logits from its hidden states). Same numbers as the dense functions.

DEFAULT_CHUNK_TOKENS = 4096


def _chunk_rows(x_NxF, chunk: int):
  """[N, ...] -> [N/C, C, ...] after zero-padding N up to a multiple of C."""
  n = x_NxF.shape[0]
  pad = -n % chunk
  if pad:
    x_NxF = jnp.pad(x_NxF, [(0, pad)] + [(0, 0)] * (x_NxF.ndim - 1))
  return x_NxF.reshape((n + pad) // chunk, chunk, *x_NxF.shape[1:])


def _check_hidden(h_BxTxD, w_DxV, targets_BxT, mask_BxT, chunk_tokens):
  if h_BxTxD.ndim < 2 or w_DxV.ndim != 2 or h_BxTxD.shape[-1] != w_DxV.shape[0]:
    raise ValueError(f"hidden/head: expected h [..., D] and w [D, V], got {h_BxTxD.shape} and "
                     f"{w_DxV.shape}")
  _check(h_BxTxD, targets_BxT, mask_BxT)
  if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")


def chunked_token_cross_entropy(h_BxTxD, w_DxV, targets_BxT, *,
                                chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                temperature: float = 1.0):
  """`token_cross_entropy(h @ w / temperature, targets)` without materialising the logits.

  h_BxTxD: final (normed) hidden states; w_DxV: the LM head (`Decoder.head_DxV`). The matmul
  runs in h's dtype, the softmax in float32, as in `Decoder.__call__`. Returns (ce_BxT, lse_BxT).
  """
  _check_hidden(h_BxTxD, w_DxV, targets_BxT, None, chunk_tokens)
  lead = h_BxTxD.shape[:-1]
  h_NxD = h_BxTxD.reshape(-1, h_BxTxD.shape[-1])
  n = h_NxD.shape[0]
  chunk = min(chunk_tokens, n)
  h_MxCxD = _chunk_rows(h_NxD, chunk)
  tgt_MxC = _chunk_rows(targets_BxT.reshape(-1).astype(jnp.int32), chunk)
  w = w_DxV.astype(h_BxTxD.dtype)

  @jax.checkpoint
  def one_chunk(args):
    h_CxD, tgt_C = args
    logits_CxV = jnp.dot(h_CxD, w).astype(jnp.float32)
    if temperature != 1.0:
      logits_CxV = logits_CxV / temperature
    return token_cross_entropy(logits_CxV, tgt_C)

  ce_MxC, lse_MxC = jax.lax.map(one_chunk, (h_MxCxD, tgt_MxC))
  return ce_MxC.reshape(-1)[:n].reshape(lead), lse_MxC.reshape(-1)[:n].reshape(lead)


def chunked_token_logprobs(h_BxTxD, w_DxV, targets_BxT, *,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS, temperature: float = 1.0):
  """log softmax(h @ w / temperature)[target] per token (float32 [B, T]), chunked.

  For policy-gradient scorers (GRPO old/ref/current log-probs of the sampled tokens): equals
  `log_softmax(model(...)[0] / temperature)` gathered at the targets, with one [C, V] block of
  logits alive at a time.
  """
  ce_BxT, _ = chunked_token_cross_entropy(h_BxTxD, w_DxV, targets_BxT,
                                          chunk_tokens=chunk_tokens, temperature=temperature)
  return -ce_BxT


def chunked_lm_loss(h_BxTxD, w_DxV, targets_BxT, mask_BxT=None, *, z_loss_coef: float = 0.0,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
  """`lm_loss(h @ w, targets, mask, z_loss_coef=...)` over token chunks. Returns (loss, aux)."""
  _check_hidden(h_BxTxD, w_DxV, targets_BxT, mask_BxT, chunk_tokens)
  ce_BxT, lse_BxT = chunked_token_cross_entropy(h_BxTxD, w_DxV, targets_BxT,
                                                chunk_tokens=chunk_tokens)
  ce = _masked_mean(ce_BxT, mask_BxT)
  zl = _masked_mean(jnp.square(lse_BxT), mask_BxT)
  aux = {"ce": ce, "z_loss": zl, "lse_mean": _masked_mean(lse_BxT, mask_BxT)}
  return ce + z_loss_coef * zl, aux
