"""Log-probability of a stored action under the current policy (the policy gradient).

Soft positions use the reparameterised noise density of the stored y' (official
verl `torch_functional.py: logprobs_from_logits_topk_*`); discrete positions use
the ordinary token log-probability.  The mode registry `soft_grpo.modes.MODES`
names each mode's function (`modes.action_logprobs` routes the positions), so an
ablation adds a function and an entry, not an `if` in the trainer.

One-step alignment: logits at position t score the action stored at t+1
(official `torch.roll(..., shifts=-1)`).  Callers pass
`logits_BxTxV[:, :-1]` together with `ids_BxTxK[:, 1:]`, `y_prime_BxTxK[:, 1:]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from soft_grpo import soft_token

# Official `logprobs_from_logits_topk_gumbel` constants.
GUMBEL_LOGPROB_EPS = 1e-6
GUMBEL_MASK_MIN_LOGPROB = -3.0
# Official `logprobs_from_logits_topk_{dirichlet,normal}`: mask p^ > 0.05.
ABLATION_MASK_MIN_PROB = 0.05
DIRICHLET_LOGPROB_CLIP = (-5.0, 3.0)
GAUSSIAN_SAMPLE_HALF_WIDTH = 0.15


def _kept_slots(y_prime):
  """Slots that take part in p^ and in the mask: y' finite (top-p removed slots are -inf).

  A row with no finite slot (never stored by the rollout) keeps all slots, so p^ stays
  finite; its mask is empty anyway.
  """
  finite = jnp.isfinite(y_prime)
  return finite, finite | ~jnp.any(finite, axis=-1, keepdims=True)


def _topk_probs(logits, topk_ids, temperature, kept):
  """p^ = softmax(logits/T)[id] / sum_{kept} softmax(logits/T)[id], 0 on removed slots.

  Renormalised over the kept slots only (issue 11): the official sampler stores a
  zero-probability id in a slot that top-p removed, so its p^ is over the kept slots; we keep
  the real runner-up id there, whose current probability must not enter p^.  The
  full-vocabulary normaliser cancels, so this is the softmax of the gathered logits: finite
  even when every stored id's full-vocabulary probability underflows in float32.
  """
  z = jnp.take_along_axis(logits, topk_ids, axis=-1).astype(jnp.float32) / temperature
  return jax.nn.softmax(jnp.where(kept, z, -jnp.inf), axis=-1)


def _masked_mean(values, mask):
  m = mask.astype(values.dtype)
  return jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / jnp.maximum(
      jnp.sum(m, axis=-1), 1.0)


def gumbel_soft_logprob(logits: jax.Array, topk_ids: jax.Array,
                        topk_gumbels: jax.Array, *,
                        temperature=1.0) -> jax.Array:
  """SofT-GRPO log-probability of a soft action (issue #5, official verl code).

    p^   = softmax(logits/T)[id] / sum(softmax(logits/T)[id])
    lp   = log(p^ + 1e-6)
    g'   = clip(y' - lp, -1.5, 3)
    m    = (lp > -3)
    logpi = sum(m * (-g' - exp(-g'))) / max(sum(m), 1)

  Slots with y' = -inf (removed by top-p, or the unused slots of a discrete
  position) take no part in p^ (renormalised over the kept slots, as the official
  code's zero-probability ids make it) nor in the mask; their y' is replaced by a
  finite value before the subtraction so neither the value nor the gradient is NaN.

  Args:
    logits: [..., V]; topk_ids: [..., K] int; topk_gumbels: [..., K] (y').
  Returns:
    [...] float32.
  """
  y = topk_gumbels.astype(jnp.float32)
  finite, kept = _kept_slots(y)
  p_hat = _topk_probs(logits, topk_ids, temperature, kept)
  lp = jnp.log(p_hat + GUMBEL_LOGPROB_EPS)
  g = jnp.clip(jnp.where(finite, y, 0.0) - lp, soft_token.GUMBEL_CLIP_LOW,
               soft_token.GUMBEL_CLIP_HIGH)
  # log-density of a standard Gumbel at g: -g - exp(-g).
  density = -g - jnp.exp(-g)
  mask = (lp > GUMBEL_MASK_MIN_LOGPROB) & finite
  return _masked_mean(density, mask)


def dirichlet_soft_logprob(logits: jax.Array, topk_ids: jax.Array,
                           topk_log_gammas: jax.Array, *, temperature=1.0,
                           dirichlet_alpha=1.0) -> jax.Array:
  """Ablation, official `logprobs_from_logits_topk_dirichlet`.

  Mean over slots with p^ > 0.05 of clip(log Gamma(x; alpha*p^, 1), -5, 3),
  where x = exp(y') is the stored gamma sample (we store its log).  p^ and the
  mask are over the kept (finite y') slots, as in `gumbel_soft_logprob`.
  """
  y = topk_log_gammas.astype(jnp.float32)
  finite, kept = _kept_slots(y)
  p_hat = _topk_probs(logits, topk_ids, temperature, kept)
  log_x = jnp.where(finite, y, 0.0)
  conc = jnp.maximum(dirichlet_alpha * p_hat, 1e-6)
  log_density = (conc - 1.0) * log_x - jnp.exp(log_x) - jax.lax.lgamma(conc)
  log_density = jnp.clip(log_density, *DIRICHLET_LOGPROB_CLIP)
  mask = (p_hat > ABLATION_MASK_MIN_PROB) & finite
  return _masked_mean(log_density, mask)


def gaussian_soft_logprob(logits: jax.Array, topk_ids: jax.Array,
                          topk_samples: jax.Array, *, temperature=1.0,
                          gaussian_std=0.05) -> jax.Array:
  """Ablation, official `logprobs_from_logits_topk_normal`.

  Mean over slots with p^ > 0.05 of log Normal(clip(n, p^-0.15, p^+0.15); p^, std).
  p^ and the mask are over the kept (finite y') slots, as in `gumbel_soft_logprob`.
  """
  y = topk_samples.astype(jnp.float32)
  finite, kept = _kept_slots(y)
  p_hat = _topk_probs(logits, topk_ids, temperature, kept)
  n = jnp.clip(jnp.where(finite, y, 0.0), p_hat - GAUSSIAN_SAMPLE_HALF_WIDTH,
               p_hat + GAUSSIAN_SAMPLE_HALF_WIDTH)
  zscore = (n - p_hat) / gaussian_std
  log_density = (-0.5 * zscore**2 - jnp.log(gaussian_std)
                 - 0.5 * jnp.log(2.0 * jnp.pi))
  mask = (p_hat > ABLATION_MASK_MIN_PROB) & finite
  return _masked_mean(log_density, mask)


def token_logprob(logits: jax.Array, token: jax.Array, *,
                  temperature=1.0) -> jax.Array:
  """log_softmax(logits / T)[token]; logits [..., V], token [...] -> [...]."""
  z = logits.astype(jnp.float32) / temperature
  z_tok = jnp.take_along_axis(z, token[..., None], axis=-1)[..., 0]
  return z_tok - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits: jax.Array, *, temperature=1.0) -> jax.Array:
  """Entropy of softmax(logits / T) over the vocabulary; [..., V] -> [...]."""
  return soft_token.entropy_from_logits(logits, temperature=temperature)
