"""GRPO loss: PPO clipped surrogate with dual-clip, k3 KL to a reference, entropy.

Pure functions on per-token arrays [B, T]; transcribed from verl 0.4
`core_algos.py` (`compute_policy_loss`, `kl_penalty("low_var_kl")`,
`agg_loss("token-mean")`), which SofT-GRPO trains with.  The log-probs come
from `logprob.action_logprobs`, so discrete and soft modes share this loss.
Registries keyed by name (`POLICY_LOSS_FNS`, `KL_FNS`) let a variant add a
function rather than an `if`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from soft_grpo import validate as v

# verl compute_policy_loss: `torch.clamp(negative_approx_kl, min=-20.0, max=20.0)`.
LOG_RATIO_CLAMP = 20.0
# verl kl_penalty low_var_kl: `torch.clamp(kld, min=-10, max=10)`.
KL_CLAMP = 10.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Official SofT-GRPO / verl defaults; every value a config field."""
  policy_loss: str = "ppo_dual_clip"
  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.2
  clip_ratio_c: float = 3.0
  kl: str = "k3"
  kl_coef: float = 0.001
  entropy_coef: float = 0.0

  def __post_init__(self):
    s = "loss"
    v.check_choice(s, "policy_loss", self.policy_loss, POLICY_LOSS_FNS)
    v.check_choice(s, "kl", self.kl, KL_FNS)
    v.check_number(s, "clip_ratio_low", self.clip_ratio_low, 0.0, hi=1.0, hi_strict=True)
    v.check_number(s, "clip_ratio_high", self.clip_ratio_high, 0.0)
    v.require(v.is_number(self.clip_ratio_c) and self.clip_ratio_c > 1.0, s, "clip_ratio_c",
              self.clip_ratio_c, "a finite number > 1")
    v.check_number(s, "kl_coef", self.kl_coef, 0.0)
    v.check_number(s, "entropy_coef", self.entropy_coef, 0.0)


def masked_token_mean(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Token-mean aggregation: sum over all response tokens / number of tokens."""
  m = mask_BxT.astype(jnp.float32)
  return jnp.sum(jnp.where(m > 0, values_BxT, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def ppo_dual_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, *,
                       clip_ratio_low=0.2, clip_ratio_high=0.2,
                       clip_ratio_c=3.0) -> tuple[jax.Array, dict]:
  """verl `compute_policy_loss` (dual-clip PPO, Ye et al. 2020), token-mean.

    ratio = exp(clamp(logp - old_logp, -20, 20))
    l1 = -A * ratio;  l2 = -A * clip(ratio, 1 - eps_low, 1 + eps_high)
    clipped = max(l1, l2)
    loss_tok = where(A < 0, min(clipped, -A * c), clipped)
  """
  log_ratio = jnp.clip(logp_BxT - old_logp_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)
  adv = advantages_BxT
  l1 = -adv * ratio
  l2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  clipped = jnp.maximum(l1, l2)
  # The dual clip bounds the loss of negative-advantage tokens by -A * c;
  # `where` first so that c = inf (plain PPO) never forms 0 * inf.
  l3 = jnp.where(adv < 0, -adv * clip_ratio_c, jnp.inf)
  loss_tok = jnp.minimum(l3, clipped)
  metrics = {
      "clip_fraction": masked_token_mean((l2 > l1).astype(jnp.float32), mask_BxT),
      "clip_fraction_lower": masked_token_mean(
          ((clipped > l3) & (adv < 0)).astype(jnp.float32), mask_BxT),
      "ppo_kl": masked_token_mean(-log_ratio, mask_BxT),
      "ratio_mean": masked_token_mean(ratio, mask_BxT),
  }
  return masked_token_mean(loss_tok, mask_BxT), metrics


def ppo_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, *,
                  clip_ratio_low=0.2, clip_ratio_high=0.2,
                  clip_ratio_c=3.0) -> tuple[jax.Array, dict]:
  """Plain PPO clip (no dual clip): ppo_dual_clip_loss with c = inf."""
  del clip_ratio_c
  return ppo_dual_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT,
                            clip_ratio_low=clip_ratio_low,
                            clip_ratio_high=clip_ratio_high,
                            clip_ratio_c=jnp.inf)


def k3_kl(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
  """Low-variance k3 estimator of KL(pi || ref), verl `low_var_kl`.

    d = clamp(ref - logp, -20, 20);  kl = exp(d) - d - 1, clamped to [-10, 10].
  """
  d = jnp.clip(ref_logp_BxT - logp_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


def k1_kl(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
  """Naive k1 estimator logp - ref (verl `kl`)."""
  return logp_BxT - ref_logp_BxT


POLICY_LOSS_FNS: dict[str, Callable] = {
    "ppo_dual_clip": ppo_dual_clip_loss,
    "ppo_clip": ppo_clip_loss,
}

KL_FNS: dict[str, Callable] = {
    "k3": k3_kl,
    "low_var_kl": k3_kl,
    "k1": k1_kl,
}


def grpo_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array,
              ref_logp_BxT: jax.Array | None, advantages_BxT: jax.Array,
              mask_BxT: jax.Array, *, config: LossConfig = LossConfig(),
              entropy_BxT: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total loss = policy loss - entropy_coef * entropy + kl_coef * KL.

  All terms are token-means over `mask_BxT` (response tokens).  `advantages_BxT`
  is the per-response advantage broadcast to tokens.  `ref_logp_BxT` may be
  None when kl_coef == 0; `entropy_BxT` may be None when entropy_coef == 0.
  Returns (scalar loss, metrics dict of scalars).
  """
  pg_loss, metrics = POLICY_LOSS_FNS[config.policy_loss](
      logp_BxT, jax.lax.stop_gradient(old_logp_BxT), advantages_BxT, mask_BxT,
      clip_ratio_low=config.clip_ratio_low,
      clip_ratio_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c)
  loss = pg_loss
  metrics = dict(metrics, pg_loss=pg_loss)
  if ref_logp_BxT is not None:
    kl = masked_token_mean(
        KL_FNS[config.kl](logp_BxT, jax.lax.stop_gradient(ref_logp_BxT)), mask_BxT)
    metrics["kl"] = kl
    loss = loss + config.kl_coef * kl
  elif config.kl_coef != 0.0:
    raise ValueError(f"ref_logp_BxT is required when kl_coef={config.kl_coef} != 0")
  if entropy_BxT is not None:
    ent = masked_token_mean(entropy_BxT, mask_BxT)
    metrics["entropy"] = ent
    loss = loss - config.entropy_coef * ent
  elif config.entropy_coef != 0.0:
    raise ValueError(
        f"entropy_BxT is required when entropy_coef={config.entropy_coef} != 0")
  metrics["loss"] = loss
  return loss, metrics
