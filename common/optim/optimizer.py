"""The LM optimizer: [global-norm clip | AdaGC] -> AdamW(warm-up + cosine), optionally
wrapped so a non-finite step is skipped. Plain functions with explicit arguments."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from common.optim.adagc import adagc as adagc_transform
from common.optim.schedules import warmup_cosine_schedule


def decay_matrices(params):
  """Weight-decay mask: decay tensors with ndim >= 2 (matmul weights, embeddings), not
  biases or norm scales (the nanoGPT / GPT-3 convention)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


class SkipNonFiniteState(NamedTuple):
  inner_state: Any
  num_skipped: jax.Array     # int32 []: total steps skipped
  last_finite: jax.Array     # bool []: whether the last step was applied


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner`; where the gradient or the update is not finite, returns zero updates and
  keeps the old inner state (moments, counts, AdaGC EMAs), so nothing is poisoned.

  Unlike `optax.apply_if_finite` there is no limit after which bad updates get through.
  """

  def init_fn(params):
    return SkipNonFiniteState(inner.init(params), jnp.zeros((), jnp.int32), jnp.array(True))

  def update_fn(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner_state, params)
    ok = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))
    out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_inner, state.inner_state)
    return out, SkipNonFiniteState(kept, state.num_skipped + (~ok).astype(jnp.int32), ok)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(*, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, grad_clip: float = 1.0,
                   adagc: bool = False, adagc_beta: float = 0.98, adagc_lambda: float = 1.05,
                   adagc_warmup_steps: int = 100, skip_nonfinite_updates: bool = False,
                   decay_mask: Callable | None = decay_matrices,
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, lr_schedule).

  grad_clip > 0: global-norm clipping to grad_clip; with adagc=True, AdaGC replaces it and
  uses grad_clip as its warm-up global threshold (lambda_abs). grad_clip <= 0: no clipping.
  decay_mask: params -> bool pytree of tensors to decay (None: all).
  """
  if weight_decay < 0:
    raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"{name}: must be in [0, 1), got {b}")
  schedule = warmup_cosine_schedule(lr, warmup_steps=warmup_steps, total_steps=total_steps,
                                    final_lr=min_lr)
  parts = []
  if adagc:
    parts.append(adagc_transform(lambda_rel=adagc_lambda, beta=adagc_beta,
                                 warmup_steps=adagc_warmup_steps,
                                 lambda_abs=grad_clip if grad_clip > 0 else None))
  elif grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)
  if skip_nonfinite_updates:
    tx = skip_nonfinite(tx)
  return tx, schedule
