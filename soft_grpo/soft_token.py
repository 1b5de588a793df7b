"""Per-step soft-token functions for SofT-GRPO rollouts (arXiv 2511.06411).

Pure JAX functions on arrays; the rollout's `lax.while_loop` calls one of them
per decoding step and the trainer calls `rebuild_soft_inputs` to recreate the
exact input embeddings from what the rollout stored.

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

Modes (registry `MODES`, so a variant adds an entry, not an `if`):
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

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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


@dataclasses.dataclass(frozen=True)
class SoftTokenConfig:
  """Static settings of a soft-thinking step; validated once at the boundary.

  Defaults follow the official SofT-GRPO scripts: top-k 5, top-p 0.95,
  Gumbel-softmax tau 0.1 for training (0.5 for soft-thinking inference),
  noise factor 1.0, Dirichlet concentration scale 1.0, Gaussian std 0.05.
  """
  mode: str = "soft_gumbel"
  temperature: float = 1.0
  top_k: int = 5
  top_p: float = 0.95
  tau: float = 0.1
  noise_factor: float = 1.0
  dirichlet_alpha: float = 1.0
  gaussian_std: float = 0.05

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {sorted(MODES)}")
    if not (isinstance(self.top_k, int) and self.top_k >= 1):
      raise ValueError(f"top_k={self.top_k!r} must be an int >= 1")
    if not 0.0 < self.temperature:
      raise ValueError(f"temperature={self.temperature!r} must be > 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
    if not 0.0 < self.tau:
      raise ValueError(f"tau={self.tau!r} must be > 0")
    if not 0.0 <= self.noise_factor:
      raise ValueError(f"noise_factor={self.noise_factor!r} must be >= 0")
    if not 0.0 < self.dirichlet_alpha:
      raise ValueError(f"dirichlet_alpha={self.dirichlet_alpha!r} must be > 0")
    if not 0.0 <= self.gaussian_std:
      raise ValueError(f"gaussian_std={self.gaussian_std!r} must be >= 0")

  def step_kwargs(self) -> dict:
    """Keyword arguments for `soft_thinking_step`."""
    return dataclasses.asdict(self)


def _check_static(name: str, value, ok: Callable, allowed: str):
  # Traced values (e.g. tau passed as an array) cannot be checked here; the
  # config dataclass is the boundary that validates them.
  if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
    raise ValueError(f"{name}={value!r} must be {allowed}")


# ----------------------------------------------------------------------------
# Filtering and noise.
# ----------------------------------------------------------------------------


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
  if not isinstance(top_k, int) or not 1 <= top_k <= logits_BxV.shape[-1]:
    raise ValueError(
        f"top_k={top_k!r} must be an int in [1, vocab={logits_BxV.shape[-1]}]")
  _check_static("temperature", temperature, lambda x: x > 0, "> 0")
  _check_static("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1]")
  z_BxV = logits_BxV.astype(jnp.float32) / temperature
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


def _safe_neg_inf(y):
  return jnp.where(jnp.isfinite(y), y, -jnp.inf)


def _sample_soft(key, p_tilde_BxK, *, noise_factor, tau, dirichlet_alpha,
                 gaussian_std):
  del key, noise_factor, tau, dirichlet_alpha, gaussian_std
  y_prime = jnp.log(p_tilde_BxK)  # -inf on removed slots; softmax(y') == p~
  return y_prime, p_tilde_BxK


def _weights_soft(y_prime_BxK, *, tau):
  del tau  # w = p~ = softmax(log p~): no temperature in plain Soft Thinking.
  return jax.nn.softmax(y_prime_BxK, axis=-1)


def _sample_soft_gumbel(key, p_tilde_BxK, *, noise_factor, tau, dirichlet_alpha,
                        gaussian_std):
  del dirichlet_alpha, gaussian_std
  # Issue #5 / official sampler.py: l = log(p~ + 1e-6); y' = l + nf * g.
  l_BxK = jnp.log(p_tilde_BxK + LOG_EPS)
  g_BxK = gumbel_noise(key, p_tilde_BxK.shape, jnp.float32)
  y_prime = l_BxK + noise_factor * g_BxK
  y_prime = jnp.where(p_tilde_BxK > 0, y_prime, -jnp.inf)
  return y_prime, _weights_soft_gumbel(y_prime, tau=tau)


def _weights_soft_gumbel(y_prime_BxK, *, tau):
  # w = softmax(y' / tau) (official sampler.py and dp_actor.py rebuild).
  return jax.nn.softmax(y_prime_BxK / tau, axis=-1)


def _sample_soft_dirichlet(key, p_tilde_BxK, *, noise_factor, tau,
                           dirichlet_alpha, gaussian_std):
  del noise_factor, tau, gaussian_std
  conc_BxK = dirichlet_alpha * p_tilde_BxK
  # loggamma(0) = -inf, so removed slots get y' = -inf and w = 0.
  y_prime = jax.random.loggamma(key, conc_BxK, dtype=jnp.float32)
  y_prime = jnp.where(conc_BxK > 0, y_prime, -jnp.inf)
  return y_prime, _weights_soft_dirichlet(y_prime, tau=1.0)


def _weights_soft_dirichlet(y_prime_BxK, *, tau):
  del tau  # w = gamma / sum(gamma) = softmax(log gamma).
  return jax.nn.softmax(y_prime_BxK, axis=-1)


def _sample_soft_gaussian(key, p_tilde_BxK, *, noise_factor, tau,
                          dirichlet_alpha, gaussian_std):
  del noise_factor, tau, dirichlet_alpha
  n_BxK = p_tilde_BxK + gaussian_std * jax.random.normal(
      key, p_tilde_BxK.shape, jnp.float32)
  y_prime = jnp.where(p_tilde_BxK > 0, n_BxK, -jnp.inf)
  return y_prime, _weights_soft_gaussian(y_prime, tau=1.0)


def _weights_soft_gaussian(y_prime_BxK, *, tau):
  del tau  # official: topk_probs = normal_samples / normal_samples.sum(-1).
  n = jnp.where(jnp.isfinite(y_prime_BxK), y_prime_BxK, 0.0)
  return n / jnp.sum(n, axis=-1, keepdims=True)


def _weights_discrete(y_prime_BxK, *, tau):
  del tau
  return jnp.zeros_like(y_prime_BxK).at[..., 0].set(1.0)


@dataclasses.dataclass(frozen=True)
class ModeSpec:
  """How a mode turns p~ into (y', w) and recovers w from stored y'."""
  sample: Callable | None     # (key, p_tilde, **noise kwargs) -> (y', w)
  weights: Callable           # (y', *, tau) -> w


MODES: dict[str, ModeSpec] = {
    "discrete": ModeSpec(sample=None, weights=_weights_discrete),
    "soft": ModeSpec(sample=_sample_soft, weights=_weights_soft),
    "soft_gumbel": ModeSpec(sample=_sample_soft_gumbel,
                            weights=_weights_soft_gumbel),
    "soft_dirichlet": ModeSpec(sample=_sample_soft_dirichlet,
                               weights=_weights_soft_dirichlet),
    "soft_gaussian": ModeSpec(sample=_sample_soft_gaussian,
                              weights=_weights_soft_gaussian),
}


def _mode_spec(mode: str) -> ModeSpec:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {sorted(MODES)}")
  return MODES[mode]


def mixture_weights(y_prime_BxK: jax.Array, *, mode: str, tau) -> jax.Array:
  """Mixture weights w recovered from stored y' (identical to the rollout's w)."""
  return _mode_spec(mode).weights(y_prime_BxK.astype(jnp.float32), tau=tau)


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
                  top_p=0.95, **unused) -> SoftStep:
  """Ordinary top-k/top-p sampling, returned in the stored one-hot format."""
  del unused
  p_tilde_BxK, ids_BxK = filter_top_k_top_p(
      logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  slot_B = jax.random.categorical(key, jnp.log(p_tilde_BxK), axis=-1)
  token_B = jnp.take_along_axis(ids_BxK, slot_B[:, None], axis=-1)[:, 0]
  ids_out, y_prime = one_hot_action(token_B, top_k)
  weights = _weights_discrete(y_prime, tau=1.0)
  return SoftStep(
      next_embed_BxD=jnp.take(embedding_VxD, token_B, axis=0),
      ids_BxK=ids_out,
      y_prime_BxK=y_prime,
      weights_BxK=weights,
      recorded_token_B=token_B,
      entropy_B=entropy_from_logits(logits_BxV, temperature=temperature))


def soft_thinking_step(key: jax.Array, logits_BxV: jax.Array,
                       embedding_VxD: jax.Array, *, mode: str = "soft_gumbel",
                       temperature=1.0, top_k: int = 5, top_p=0.95, tau=0.1,
                       noise_factor=1.0, dirichlet_alpha=1.0,
                       gaussian_std=0.05) -> SoftStep:
  """One soft-thinking step (issue #5 "Rollout", steps 1-6).

  `mode` and `top_k` must be static Python values; the float settings may be
  Python floats or traced scalars.  In `discrete` mode this is `discrete_step`.
  """
  spec = _mode_spec(mode)
  if spec.sample is None:
    return discrete_step(key, logits_BxV, embedding_VxD,
                         temperature=temperature, top_k=top_k, top_p=top_p)
  _check_static("tau", tau, lambda x: x > 0, "> 0")
  _check_static("noise_factor", noise_factor, lambda x: x >= 0, ">= 0")
  _check_static("dirichlet_alpha", dirichlet_alpha, lambda x: x > 0, "> 0")
  _check_static("gaussian_std", gaussian_std, lambda x: x >= 0, ">= 0")
  p_tilde_BxK, ids_BxK = filter_top_k_top_p(
      logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  y_prime_BxK, w_BxK = spec.sample(
      key, p_tilde_BxK, noise_factor=noise_factor, tau=tau,
      dirichlet_alpha=dirichlet_alpha, gaussian_std=gaussian_std)
  # Official sampler.py: sort (ids, y') by w descending; the recorded token is
  # ids[0] (argmax w, which is argmax y' for the Gumbel mode).
  order_BxK = jnp.argsort(-w_BxK, axis=-1, stable=True)
  w_BxK = jnp.take_along_axis(w_BxK, order_BxK, axis=-1)
  ids_BxK = jnp.take_along_axis(ids_BxK, order_BxK, axis=-1)
  y_prime_BxK = jnp.take_along_axis(y_prime_BxK, order_BxK, axis=-1)
  return SoftStep(
      next_embed_BxD=mix_embeddings(w_BxK, ids_BxK, embedding_VxD),
      ids_BxK=ids_BxK,
      y_prime_BxK=y_prime_BxK,
      weights_BxK=w_BxK,
      recorded_token_B=ids_BxK[:, 0],
      entropy_B=entropy_from_logits(logits_BxV, temperature=temperature))


def rebuild_soft_inputs(ids_BxTxK: jax.Array, y_prime_BxTxK: jax.Array,
                        embedding_VxD: jax.Array, *, tau,
                        mode: str = "soft_gumbel") -> jax.Array:
  """Input embeddings [B, T, D] from stored actions, detached (stop_gradient).

  Uses the same w as the rollout (per-mode `mixture_weights`).  Discrete
  positions (ids[1:] == 0) get w = one_hot(0), i.e. exactly E[tok], as in the
  official dp_actor.py which forces y'[1:] = -inf there.  No gradient flows
  through the mixture, neither to y' nor to the embedding table (official
  `inputs_embeds=topk_embs.detach()`).
  """
  w_soft = mixture_weights(y_prime_BxTxK, mode=mode, tau=tau)
  w_disc = _weights_discrete(y_prime_BxTxK, tau=tau)
  w = jnp.where(is_discrete_action(ids_BxTxK)[..., None], w_disc, w_soft)
  return jax.lax.stop_gradient(mix_embeddings(w, ids_BxTxK, embedding_VxD))
