"""The rollout-mode registry: one entry per mode, and the functions that dispatch on it.

An entry holds the mode's sampler of y' (`soft_token.sample_*`), its mixture weights w
(`soft_token.weights_*`), its soft-position log-prob (`logprob.*_soft_logprob`) and the
`RolloutConfig` settings each of them takes. A variant adds an entry, not an `if`: nothing
outside this module branches on the mode name, and every function gets only its own settings
(the dispatchers below accept any mode's settings and pass each function its own; a setting
not given keeps the function's default, the official value).

  discrete       plain top-k/top-p sampling, stored one-hot; every position scored as a token.
  soft           Soft Thinking without noise: y' = log p~, w = p~; scored as a Gumbel sample
                 at g = 0 (an inference mode: it has no sampling density of its own).
  soft_gumbel    SofT-GRPO: y' = log(p~ + 1e-6) + noise_factor * g, w = softmax(y' / tau).
  soft_dirichlet ablation: y' = log gamma, gamma ~ Gamma(alpha p~), w = softmax(y').
  soft_gaussian  ablation: y' = n ~ Normal(p~, std), w = n / sum(n).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from soft_grpo import logprob as logprob_lib
from soft_grpo import soft_token
from soft_grpo.soft_token import SoftStep


@dataclasses.dataclass(frozen=True)
class Mode:
  """One rollout mode. `sample` is None for "discrete" (no soft tokens)."""
  sample: Callable | None        # (key, p_tilde_BxK, **sample_settings) -> y'_BxK
  weights: Callable              # (y'_BxK, **weight_settings) -> w_BxK
  logprob: Callable | None       # soft positions: (logits, ids, y', *, temperature,
                                 #   **logprob_settings) -> [...]; None: all positions tokens
  sample_settings: tuple[str, ...] = ()
  weight_settings: tuple[str, ...] = ()
  logprob_settings: tuple[str, ...] = ()

  @property
  def soft(self) -> bool:
    """Thinking positions are soft tokens (inputs rebuilt as detached mixtures)."""
    return self.sample is not None

  @property
  def settings(self) -> tuple[str, ...]:
    """The `RolloutConfig` fields this mode reads."""
    return tuple(dict.fromkeys(self.sample_settings + self.weight_settings
                               + self.logprob_settings))


MODES: dict[str, Mode] = {
    "discrete": Mode(sample=None, weights=soft_token.weights_discrete, logprob=None),
    "soft": Mode(sample=soft_token.sample_soft, weights=soft_token.weights_softmax,
                 logprob=logprob_lib.gumbel_soft_logprob),
    "soft_gumbel": Mode(sample=soft_token.sample_soft_gumbel,
                        weights=soft_token.weights_gumbel_softmax,
                        logprob=logprob_lib.gumbel_soft_logprob,
                        sample_settings=("noise_factor",), weight_settings=("tau",)),
    "soft_dirichlet": Mode(sample=soft_token.sample_soft_dirichlet,
                           weights=soft_token.weights_softmax,
                           logprob=logprob_lib.dirichlet_soft_logprob,
                           sample_settings=("dirichlet_alpha",),
                           logprob_settings=("dirichlet_alpha",)),
    "soft_gaussian": Mode(sample=soft_token.sample_soft_gaussian,
                          weights=soft_token.weights_gaussian,
                          logprob=logprob_lib.gaussian_soft_logprob,
                          sample_settings=("gaussian_std",),
                          logprob_settings=("gaussian_std",)),
}

# Settings that are checked where they are static Python numbers (the config dataclass is
# the boundary; traced values cannot be checked here).
_STATIC_CHECKS = {
    "tau": (lambda x: x > 0, "> 0"),
    "noise_factor": (lambda x: x >= 0, ">= 0"),
    "dirichlet_alpha": (lambda x: x > 0, "> 0"),
    "gaussian_std": (lambda x: x >= 0, ">= 0"),
}


def get_mode(name: str) -> Mode:
  if name not in MODES:
    raise ValueError(f"rollout.mode: got {name!r}; allowed: {list(MODES)}")
  return MODES[name]


def settings_of(cfg, mode: str) -> dict:
  """{setting: value} of `mode` read from a config with those fields (`RolloutConfig`)."""
  return {name: getattr(cfg, name) for name in get_mode(mode).settings}


def _pick(names: tuple[str, ...], settings: dict) -> dict:
  """The settings one function takes (absent ones keep the function's official default)."""
  return {n: settings[n] for n in names if n in settings}


def mixture_weights(y_prime_BxK: jax.Array, *, mode: str, **settings) -> jax.Array:
  """Mixture weights w recovered from stored y' (identical to the rollout's w)."""
  m = get_mode(mode)
  return m.weights(y_prime_BxK.astype(jnp.float32), **_pick(m.weight_settings, settings))


def soft_thinking_step(key: jax.Array, logits_BxV: jax.Array, embedding_VxD: jax.Array, *,
                       mode: str = "soft_gumbel", temperature=1.0, top_k: int = 5,
                       top_p=0.95, **settings) -> SoftStep:
  """One soft-thinking step (issue #5 "Rollout", steps 1-6) in `mode`.

  `mode` and `top_k` must be static Python values; the float settings may be Python floats
  or traced scalars. `settings` holds the mode's own settings (`Mode.settings`, e.g. tau and
  noise_factor for soft_gumbel). In "discrete" this is `soft_token.discrete_step`.
  """
  m = get_mode(mode)
  for name, value in settings.items():
    if name in _STATIC_CHECKS:
      soft_token.check_static(name, value, *_STATIC_CHECKS[name])
  if not m.soft:
    return soft_token.discrete_step(key, logits_BxV, embedding_VxD,
                                    temperature=temperature, top_k=top_k, top_p=top_p)
  p_tilde_BxK, ids_BxK = soft_token.filter_top_k_top_p(
      logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  y_prime_BxK = m.sample(key, p_tilde_BxK, **_pick(m.sample_settings, settings))
  w_BxK = mixture_weights(y_prime_BxK, mode=mode, **settings)
  # Official sampler.py: sort (ids, y') by w descending; the recorded token is
  # ids[0] (argmax w, which is argmax y' for the Gumbel mode).
  order_BxK = jnp.argsort(-w_BxK, axis=-1, stable=True)
  w_BxK = jnp.take_along_axis(w_BxK, order_BxK, axis=-1)
  ids_BxK = jnp.take_along_axis(ids_BxK, order_BxK, axis=-1)
  y_prime_BxK = jnp.take_along_axis(y_prime_BxK, order_BxK, axis=-1)
  return SoftStep(
      next_embed_BxD=soft_token.mix_embeddings(w_BxK, ids_BxK, embedding_VxD),
      ids_BxK=ids_BxK,
      y_prime_BxK=y_prime_BxK,
      weights_BxK=w_BxK,
      recorded_token_B=ids_BxK[:, 0],
      entropy_B=soft_token.entropy_from_logits(logits_BxV, temperature=temperature))


def rebuild_soft_inputs(ids_BxTxK: jax.Array, y_prime_BxTxK: jax.Array,
                        embedding_VxD: jax.Array, *, mode: str = "soft_gumbel",
                        **settings) -> jax.Array:
  """Input embeddings [B, T, D] from stored actions, detached (stop_gradient).

  Uses the same w as the rollout (the mode's `weights`).  Discrete positions (ids[1:] == 0)
  get w = one_hot(0), i.e. exactly E[tok], as in the official dp_actor.py which forces
  y'[1:] = -inf there.  No gradient flows through the mixture, neither to y' nor to the
  embedding table (official `inputs_embeds=topk_embs.detach()`).
  """
  w_soft = mixture_weights(y_prime_BxTxK, mode=mode, **settings)
  w_disc = soft_token.weights_discrete(y_prime_BxTxK)
  w = jnp.where(soft_token.is_discrete_action(ids_BxTxK)[..., None], w_disc, w_soft)
  return jax.lax.stop_gradient(soft_token.mix_embeddings(w, ids_BxTxK, embedding_VxD))


def action_logprobs(logits_BxTxV: jax.Array, ids_BxTxK: jax.Array,
                    y_prime_BxTxK: jax.Array, *, temperature=1.0,
                    mode: str = "soft_gumbel", **settings) -> jax.Array:
  """Per-position log-prob of stored actions -> [B, T] float32.

  A position is soft iff any of ids[..., 1:] != 0 (official dp_actor.py rule); soft
  positions use the mode's `logprob`, the others the ordinary token log-prob of ids[..., 0].
  Alignment is the caller's job: pass `logits[:, :-1]` with `ids[:, 1:]` / `y_prime[:, 1:]`.
  In "discrete" every position is scored as a token.
  """
  if logits_BxTxV.shape[:-1] != ids_BxTxK.shape[:-1] or (
      ids_BxTxK.shape != y_prime_BxTxK.shape):
    raise ValueError(
        f"shapes disagree: logits {logits_BxTxV.shape}, ids {ids_BxTxK.shape},"
        f" y_prime {y_prime_BxTxK.shape}; expected [..., V], [..., K], [..., K]"
        " with equal leading dims")
  m = get_mode(mode)
  discrete_lp = logprob_lib.token_logprob(logits_BxTxV, ids_BxTxK[..., 0],
                                          temperature=temperature)
  if m.logprob is None:
    return discrete_lp
  soft_lp = m.logprob(logits_BxTxV, ids_BxTxK, y_prime_BxTxK, temperature=temperature,
                      **_pick(m.logprob_settings, settings))
  is_soft = ~soft_token.is_discrete_action(ids_BxTxK)
  return jnp.where(is_soft, soft_lp, discrete_lp)
