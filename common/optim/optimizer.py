"""The one optimizer factory, for the LM and for GRPO:

  [global-norm clip | AdaGC] -> AdamW(warm-up + cosine, or a constant lr) [-> skip non-finite]

LM: `make_optimizer(lr=..., min_lr=..., warmup_steps=..., total_steps=..., adagc=...)`.
GRPO (official verl actor defaults): `make_optimizer(lr=..., b2=0.999, weight_decay=0.01,
decay_mask=None)` with total_steps=None, i.e. a constant lr and clip-by-global-norm.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.optim.adagc import adagc as adagc_transform


def decay_matrices(params):
  """Weight-decay mask: decay tensors with ndim >= 2 (matmul weights, embeddings), not
  biases or norm scales (the nanoGPT / GPT-3 convention)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def warmup_cosine_schedule(peak_lr: float, *, warmup_steps: int, total_steps: int,
                           final_lr: float) -> optax.Schedule:
  """Linear warm-up to peak_lr over warmup_steps, then cosine decay to final_lr at total_steps.

  lr(s) = peak * (s + 1) / warmup                          for s < warmup
        = final + (peak - final) * (1 + cos(pi * p)) / 2   p = (s - warmup) / (total - warmup)
  and final_lr after total_steps. The (s + 1) makes the first step's lr non-zero, which
  `optax.warmup_cosine_decay_schedule` (lr 0 at step 0) does not, hence the join of optax's
  linear and cosine schedules.
  """
  if peak_lr <= 0 or final_lr < 0 or final_lr > peak_lr:
    raise ValueError(f"optimizer.lr: need 0 <= final_lr <= peak_lr and peak_lr > 0, got "
                     f"peak_lr={peak_lr}, final_lr={final_lr}")
  if warmup_steps < 0 or total_steps < warmup_steps:
    raise ValueError(f"optimizer.warmup_steps: got {warmup_steps} with total_steps="
                     f"{total_steps}; allowed: 0..total_steps")
  cosine = optax.cosine_decay_schedule(peak_lr, decay_steps=max(total_steps - warmup_steps, 1),
                                       alpha=final_lr / peak_lr)
  if warmup_steps == 0:
    return cosine
  warm = optax.linear_schedule(peak_lr / warmup_steps, peak_lr,
                               transition_steps=max(warmup_steps - 1, 1))
  return optax.join_schedules([warm, cosine], boundaries=[warmup_steps])


def make_optimizer(*, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
                   total_steps: int | None = None,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, grad_clip: float = 1.0,
                   adagc: bool = False, adagc_beta: float = 0.98, adagc_lambda: float = 1.05,
                   adagc_warmup_steps: int = 100, skip_nonfinite: bool = False,
                   decay_mask: Callable | None = decay_matrices,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, lr_schedule).

  total_steps=None: constant lr (passed to AdamW as a number, so the state has no schedule
  count); else warm-up + cosine from lr to min_lr (`warmup_cosine_schedule`).
  grad_clip > 0: global-norm clipping to grad_clip; with adagc=True, AdaGC replaces it and
  uses grad_clip as its warm-up global threshold (lambda_abs). grad_clip <= 0: no clipping.
  decay_mask: params -> bool pytree of tensors to decay (None: all).
  skip_nonfinite: `optax.apply_if_finite` with no limit (a non-finite gradient never gets
  through, however many come in a row); the LM step also keeps its own finite check.
  """
  if weight_decay < 0:
    raise ValueError(f"optimizer.weight_decay: got {weight_decay}; allowed: >= 0")
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"optimizer.{name}: got {b}; allowed: [0, 1)")
  if total_steps is None:
    if lr < 0:
      raise ValueError(f"optimizer.lr: got {lr}; allowed: >= 0")
    schedule, adam_lr = optax.constant_schedule(lr), lr
  else:
    schedule = adam_lr = warmup_cosine_schedule(lr, warmup_steps=warmup_steps,
                                                total_steps=total_steps, final_lr=min_lr)
  parts = []
  if adagc:
    parts.append(adagc_transform(lambda_rel=adagc_lambda, beta=adagc_beta,
                                 warmup_steps=adagc_warmup_steps,
                                 lambda_abs=grad_clip if grad_clip > 0 else None))
  elif grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(adam_lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)
  if skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=int(np.iinfo(np.int32).max))
  return tx, schedule
