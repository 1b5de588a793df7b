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
