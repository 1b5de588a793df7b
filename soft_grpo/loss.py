"""GRPO loss: PPO clipped surrogate with dual-clip, k3 KL to a reference, entropy.

Pure functions on per-token arrays [B, T]; transcribed from verl 0.4
`core_algos.py` (`compute_policy_loss`, `kl_penalty("low_var_kl")`,
`agg_loss("token-mean")`), which SofT-GRPO trains with.  How token losses are
aggregated into one number is `LossConfig.loss_agg` (`loss_token_weights`).  The log-probs come
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
# How per-token losses become the mini-batch loss (`loss_token_weights`).
LOSS_AGGS = ("token_mean", "token_mean_per_micro")


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
  # "token_mean": one token-mean over the whole mini-batch. "token_mean_per_micro": verl's
  # token-mean over each micro-batch of `loss_agg_micro_rows` rows, / number of micro-batches.
  loss_agg: str = "token_mean"
  loss_agg_micro_rows: int = 2        # official ppo_micro_batch_size_per_gpu

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
    v.check_choice(s, "loss_agg", self.loss_agg, LOSS_AGGS)
    v.check_int(s, "loss_agg_micro_rows", self.loss_agg_micro_rows, 1)


def masked_token_mean(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Token-mean aggregation: sum over all response tokens / number of tokens."""
  m = mask_BxT.astype(jnp.float32)
  return jnp.sum(jnp.where(m > 0, values_BxT, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def loss_token_weights(mask_BxT: jax.Array, *, loss_agg: str = "token_mean",
                       micro_rows: int = 2) -> jax.Array:
  """Weights w_BxT such that the aggregated loss is sum(w * loss_tok) (0 off the mask).

    token_mean:           w = m / sum(m)                  (one mean over the mini-batch)
    token_mean_per_micro: rows split into G = B / micro_rows consecutive micro-batches g,
                          w = m / (G * max(sum_g(m), 1))  (verl dp_actor: agg_loss
                          "token-mean" per micro-batch, / gradient_accumulation; with data
                          parallelism the all-reduce averages the GPUs' micro-batches too)

  Computed once on the whole mini-batch, so a gradient accumulated over memory micro-batches
  (any row split) sums to the same loss.
  """
  m = mask_BxT.astype(jnp.float32)
  if loss_agg == "token_mean":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  if loss_agg != "token_mean_per_micro":
    raise ValueError(f"loss_agg={loss_agg!r} is not one of {list(LOSS_AGGS)}")
  b = m.shape[0]
  if not isinstance(micro_rows, int) or micro_rows < 1 or b % micro_rows:
    raise ValueError(f"loss_agg_micro_rows={micro_rows!r} must be an int >= 1 that divides "
                     f"the mini-batch rows {b}")
  groups = b // micro_rows
  count_G = jnp.sum(m.reshape(groups, -1), axis=-1)
  count_B = jnp.repeat(jnp.maximum(count_G, 1.0), micro_rows)
  return m / (groups * count_B[:, None])


def weighted_sum(values_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
  """sum(w * values), with values ignored (not 0 * NaN) where w = 0."""
  return jnp.sum(jnp.where(weights_BxT != 0, values_BxT, 0.0) * weights_BxT)


def _agg(values_BxT, mask_BxT, weights_BxT):
  if weights_BxT is None:
    return masked_token_mean(values_BxT, mask_BxT)
  return weighted_sum(values_BxT, weights_BxT)


def ppo_dual_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, *,
                       clip_ratio_low=0.2, clip_ratio_high=0.2,
                       clip_ratio_c=3.0, weights_BxT=None) -> tuple[jax.Array, dict]:
  """verl `compute_policy_loss` (dual-clip PPO, Ye et al. 2020), token-mean.

  `weights_BxT` (from `loss_token_weights`) replaces the token-mean over `mask_BxT`.

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
  agg = lambda x: _agg(x, mask_BxT, weights_BxT)
  metrics = {
      "clip_fraction": agg((l2 > l1).astype(jnp.float32)),
      "clip_fraction_lower": agg(((clipped > l3) & (adv < 0)).astype(jnp.float32)),
      "ppo_kl": agg(-log_ratio),
      "ratio_mean": agg(ratio),
  }
  return agg(loss_tok), metrics


def ppo_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, *,
                  clip_ratio_low=0.2, clip_ratio_high=0.2,
                  clip_ratio_c=3.0, weights_BxT=None) -> tuple[jax.Array, dict]:
  """Plain PPO clip (no dual clip): ppo_dual_clip_loss with c = inf."""
  del clip_ratio_c
  return ppo_dual_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT,
                            clip_ratio_low=clip_ratio_low,
                            clip_ratio_high=clip_ratio_high,
                            clip_ratio_c=jnp.inf, weights_BxT=weights_BxT)


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
              entropy_BxT: jax.Array | None = None,
              weights_BxT: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total loss = policy loss - entropy_coef * entropy + kl_coef * KL.

  All terms are aggregated over `mask_BxT` (response tokens) as `config.loss_agg` says
  (verl applies `agg_loss` to each term), with `loss_token_weights` computed here, or
  `weights_BxT` when given (a memory micro-batch of a mini-batch whose weights were
  computed on the whole mini-batch; then the loss is this micro-batch's share).  `advantages_BxT`
  is the per-response advantage broadcast to tokens.  `ref_logp_BxT` may be
  None when kl_coef == 0; `entropy_BxT` may be None when entropy_coef == 0.
  Returns (scalar loss, metrics dict of scalars).
  """
  if weights_BxT is None:
    weights_BxT = loss_token_weights(mask_BxT, loss_agg=config.loss_agg,
                                     micro_rows=config.loss_agg_micro_rows)
  pg_loss, metrics = POLICY_LOSS_FNS[config.policy_loss](
      logp_BxT, jax.lax.stop_gradient(old_logp_BxT), advantages_BxT, mask_BxT,
      clip_ratio_low=config.clip_ratio_low,
      clip_ratio_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c,
      weights_BxT=weights_BxT)
  loss = pg_loss
  metrics = dict(metrics, pg_loss=pg_loss)
  if ref_logp_BxT is not None:
    kl = weighted_sum(
        KL_FNS[config.kl](logp_BxT, jax.lax.stop_gradient(ref_logp_BxT)), weights_BxT)
    metrics["kl"] = kl
    loss = loss + config.kl_coef * kl
  elif config.kl_coef != 0.0:
    raise ValueError(f"ref_logp_BxT is required when kl_coef={config.kl_coef} != 0")
  if entropy_BxT is not None:
    ent = weighted_sum(entropy_BxT, weights_BxT)
    metrics["entropy"] = ent
    loss = loss - config.entropy_coef * ent
  elif config.entropy_coef != 0.0:
    raise ValueError(
        f"entropy_BxT is required when entropy_coef={config.entropy_coef} != 0")
  metrics["loss"] = loss
  return loss, metrics
