"""Per-step soft-token functions for SofT-GRPO rollouts (arXiv 2511.06411).

Pure JAX functions on arrays: top-k/top-p filtering, noise, each mode's sampler
of y' and its mixture weights w, and the stored one-hot format.  The registry
`soft_grpo.modes.MODES` puts one mode's pieces together (and dispatches the
rollout's step and the scorer's rebuild of the inputs).

Stored representation of one action (per position, K = top_k slots):
  * soft position:     ids = the K top-k token ids, y' = the K perturbed scores,
                       both sorted by mixture weight w, descending.
  * discrete position: ids = [tok, 0, ..., 0], y' = [0, -inf, ..., -inf]
                       (official verl `dp_actor.py` detects it as ids[1:] == 0
                       and forces y'[1:] = -inf, so w = one_hot(0)).
  * slots removed by top-p keep their real top-k id but get p~ = 0 and
    y' = -inf, hence weight exactly 0 in the mixture.  The official sampler
    stores a zero-probability id there with log(0 + 1e-6) + g (finite), which
    gives the same mixture (weight ~exp(-130)) and, because that id has ~0
    probability under any policy, a log-prob whose p^ is renormalised over the
    kept slots only.  Our removed ids are real runner-ups that still carry
    probability, so `logprob.py` must (and does) leave y' = -inf slots out of
    p^ and out of the mask; counting them in p^ changed log pi by up to 0.49
    and the gradient of confident positions ~50x (issue 11).

Modes (registry `soft_grpo.modes.MODES`, so a variant adds an entry, not an `if`):
  discrete       plain top-k/top-p sampling, stored one-hot.
  soft           Soft Thinking without noise: w = p~, y' = log p~.
  soft_gumbel    SofT-GRPO: y' = log(p~ + 1e-6) + noise_factor * g,
                 g = clip(-log E, -1.5, 3), E ~ Exp(1); w = softmax(y' / tau).
  soft_dirichlet ablation, official sampler.py: gamma_i ~ Gamma(alpha * p~_i, 1),
                 w = gamma / sum(gamma).  We store y' = log(gamma) (sampled
                 with `jax.random.loggamma`, stable for tiny concentrations),
                 so w = softmax(y') exactly and removed slots (alpha*p~ = 0)
                 get y' = -inf automatically.
  soft_gaussian  ablation, official sampler.py: n_i ~ Normal(p~_i, std=0.05)
                 on the renormalised top-k *probabilities* (not log-probs),
                 w = n / sum(n) (may be negative, as in the official code).
                 y' = n on kept slots, -inf on removed slots (the official code
                 also perturbs zero-probability slots; we leave them at 0).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from common import sampler as sampler_lib

# Official sampler.py: `(-torch.empty_like(l).exponential_().log()).clamp(-1.5, 3)`.
GUMBEL_CLIP_LOW = -1.5
GUMBEL_CLIP_HIGH = 3.0
# Official sampler.py: `topk_logits = torch.log(topk_probs + 1e-6)`.
LOG_EPS = 1e-6


class SoftStep(NamedTuple):
  """What one thinking step produces (B = batch, K = top_k, D = model dim)."""
  next_embed_BxD: jax.Array      # input embedding for the next position
  ids_BxK: jax.Array             # int32 token ids, sorted by weight (desc)
  y_prime_BxK: jax.Array         # float32 perturbed scores y' (same order)
  weights_BxK: jax.Array         # float32 mixture weights w (same order)
  recorded_token_B: jax.Array    # int32 ids_BxK[:, 0]: argmax y' for soft_gumbel
  entropy_B: jax.Array           # float32 entropy of unfiltered softmax(logits/T)


def check_static(name: str, value, ok: Callable, allowed: str):
  # Traced values (e.g. tau passed as an array) cannot be checked here; the
  # config dataclass is the boundary that validates them.
  if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
    raise ValueError(f"{name}={value!r} must be {allowed}")


# ----------------------------------------------------------------------------
# Filtering and noise.
# ----------------------------------------------------------------------------


def _tempered_logits(logits_BxV, *, temperature, top_k: int, top_p) -> jax.Array:
  """float32 logits / T, after checking the static top-k / top-p / temperature settings."""
  if not isinstance(top_k, int) or not 1 <= top_k <= logits_BxV.shape[-1]:
    raise ValueError(
        f"top_k={top_k!r} must be an int in [1, vocab={logits_BxV.shape[-1]}]")
  check_static("temperature", temperature, lambda x: x > 0, "> 0")
  check_static("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1]")
  return logits_BxV.astype(jnp.float32) / temperature


def filter_top_k_top_p(logits_BxV: jax.Array, *, temperature, top_k: int,
                       top_p) -> tuple[jax.Array, jax.Array]:
  """softmax(logits / T), keep top-k, then top-p over the kept entries.

  Mirrors the official sampler (sgl_kernel `top_k_renorm_prob` then
  `top_p_renorm_prob`, then `topk(max_topk)` and renormalise).  Top-p keeps the
  smallest prefix of the (descending) renormalised top-k probabilities whose
  mass reaches `top_p`: entry i is kept iff the mass strictly before it is
  < top_p, so the first entry is always kept.

  Returns:
    p_tilde_BxK: float32, renormalised over the kept entries; entries removed
      by top-p are exactly 0.  Fixed K slots so the shape is jit-static.
    ids_BxK: int32 token ids in descending probability order (removed slots
      keep their real ids).
  """
  z_BxV = _tempered_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  # top-k on logits == top-k on probabilities (softmax is monotonic), and the
  # full-vocabulary normaliser cancels in the renormalisation over K.
  z_BxK, ids_BxK = jax.lax.top_k(z_BxV, top_k)
  p_BxK = jax.nn.softmax(z_BxK, axis=-1)
  mass_before_BxK = jnp.cumsum(p_BxK, axis=-1) - p_BxK
  keep_BxK = mass_before_BxK < top_p
  keep_BxK = keep_BxK.at[..., 0].set(True)
  p_BxK = jnp.where(keep_BxK, p_BxK, 0.0)
  p_tilde_BxK = p_BxK / jnp.sum(p_BxK, axis=-1, keepdims=True)
  return p_tilde_BxK, ids_BxK.astype(jnp.int32)


def sample_top_k_top_p(key: jax.Array, logits_BxV: jax.Array, *, temperature, top_k: int,
                       top_p) -> jax.Array:
  """A token from softmax(logits / T) restricted to top-k then top-p -> int32 [B].

  The same distribution as `jax.random.categorical` over `common.sampler.filter_logits`, drawn
  over the K candidates only (`common.sampler.sample_filtered`, the one such draw): no
  vocabulary-wide sort, noise or normaliser per step.
  """
  z_BxV = _tempered_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return sampler_lib.sample_filtered(key, z_BxV, top_k=top_k, top_p=top_p).astype(jnp.int32)


def gumbel_noise_unclamped(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """g = -log(E), E ~ Exponential(1): a Gumbel(0, 1) draw (mean 0.5772, var pi^2/6)."""
  return -jnp.log(jax.random.exponential(key, shape, dtype))


def gumbel_noise(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Clamped Gumbel draw used by the rollout (official sampler.py clamp(-1.5, 3))."""
  return jnp.clip(gumbel_noise_unclamped(key, shape, dtype), GUMBEL_CLIP_LOW,
                  GUMBEL_CLIP_HIGH)


def entropy_from_logits(logits_BxV: jax.Array, *, temperature=1.0) -> jax.Array:
  """Entropy of the unfiltered softmax(logits / T) (for the cold stop)."""
  z = logits_BxV.astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ----------------------------------------------------------------------------
# Per-mode sampling of (y', w) from p~ and per-mode weights from stored y'.
# ----------------------------------------------------------------------------


def sample_soft(key, p_tilde_BxK):
  """Soft Thinking without noise: y' = log p~ (-inf on removed slots)."""
  del key
  return jnp.log(p_tilde_BxK)


def sample_soft_gumbel(key, p_tilde_BxK, *, noise_factor=1.0):
  """Issue #5 / official sampler.py: l = log(p~ + 1e-6); y' = l + nf * g."""
  l_BxK = jnp.log(p_tilde_BxK + LOG_EPS)
  g_BxK = gumbel_noise(key, p_tilde_BxK.shape, jnp.float32)
  return jnp.where(p_tilde_BxK > 0, l_BxK + noise_factor * g_BxK, -jnp.inf)


def sample_soft_dirichlet(key, p_tilde_BxK, *, dirichlet_alpha=1.0):
  """y' = log gamma, gamma_i ~ Gamma(alpha * p~_i, 1); loggamma(0) = -inf on removed slots."""
  conc_BxK = dirichlet_alpha * p_tilde_BxK
  y_prime = jax.random.loggamma(key, conc_BxK, dtype=jnp.float32)
  return jnp.where(conc_BxK > 0, y_prime, -jnp.inf)


def sample_soft_gaussian(key, p_tilde_BxK, *, gaussian_std=0.05):
  """y' = n_i ~ Normal(p~_i, std) on kept slots, -inf on removed ones."""
  n_BxK = p_tilde_BxK + gaussian_std * jax.random.normal(key, p_tilde_BxK.shape, jnp.float32)
  return jnp.where(p_tilde_BxK > 0, n_BxK, -jnp.inf)


def weights_softmax(y_prime_BxK):
  """w = softmax(y'): p~ for "soft", gamma / sum(gamma) for "soft_dirichlet"."""
  return jax.nn.softmax(y_prime_BxK, axis=-1)


def weights_gumbel_softmax(y_prime_BxK, *, tau=0.1):
  """w = softmax(y' / tau) (official sampler.py and dp_actor.py rebuild)."""
  return jax.nn.softmax(y_prime_BxK / tau, axis=-1)


def weights_gaussian(y_prime_BxK):
  """Official: topk_probs = normal_samples / normal_samples.sum(-1) (may be negative)."""
  n = jnp.where(jnp.isfinite(y_prime_BxK), y_prime_BxK, 0.0)
  return n / jnp.sum(n, axis=-1, keepdims=True)


def weights_discrete(y_prime_BxK):
  """w = one_hot(0): a discrete position feeds exactly E[ids[0]]."""
  return jnp.zeros_like(y_prime_BxK).at[..., 0].set(1.0)


def mix_embeddings(weights_BxK: jax.Array, ids_BxK: jax.Array,
                   embedding_VxD: jax.Array) -> jax.Array:
  """sum_i w_i * E[id_i], computed in float32, returned in the table's dtype."""
  e_BxKxD = jnp.take(embedding_VxD, ids_BxK, axis=0).astype(jnp.float32)
  out = jnp.einsum("...k,...kd->...d", weights_BxK.astype(jnp.float32), e_BxKxD)
  return out.astype(embedding_VxD.dtype)


def one_hot_action(token_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Discrete action in the stored format: ids=[tok,0..], y'=[0,-inf..]."""
  token_B = token_B.astype(jnp.int32)
  ids = jnp.zeros(token_B.shape + (k,), jnp.int32).at[..., 0].set(token_B)
  y_prime = jnp.full(token_B.shape + (k,), -jnp.inf, jnp.float32)
  y_prime = y_prime.at[..., 0].set(0.0)
  return ids, y_prime


def is_discrete_action(ids_BxK: jax.Array) -> jax.Array:
  """Official dp_actor.py rule: a position is discrete iff ids[1:] are all 0."""
  return jnp.all(ids_BxK[..., 1:] == 0, axis=-1)


# ----------------------------------------------------------------------------
# Public step functions.
# ----------------------------------------------------------------------------


def discrete_step(key: jax.Array, logits_BxV: jax.Array,
                  embedding_VxD: jax.Array, *, temperature=1.0, top_k: int = 5,
                  top_p=0.95) -> SoftStep:
  """Ordinary top-k/top-p sampling, returned in the stored one-hot format."""
  token_B = sample_top_k_top_p(key, logits_BxV, temperature=temperature, top_k=top_k,
                               top_p=top_p)
  ids_out, y_prime = one_hot_action(token_B, top_k)
  weights = weights_discrete(y_prime)
  return SoftStep(
      next_embed_BxD=jnp.take(embedding_VxD, token_B, axis=0),
      ids_BxK=ids_out,
      y_prime_BxK=y_prime,
      weights_BxK=weights,
      recorded_token_B=token_B,
      entropy_B=entropy_from_logits(logits_BxV, temperature=temperature))
