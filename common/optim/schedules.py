"""Learning-rate schedules."""

from __future__ import annotations

import jax.numpy as jnp


def warmup_cosine_schedule(peak_lr: float, *, warmup_steps: int, total_steps: int,
                           final_lr: float):
  """Linear warm-up to peak_lr over warmup_steps, then cosine decay to final_lr at total_steps.

  lr(s) = peak * (s + 1) / warmup                          for s < warmup
        = final + (peak - final) * (1 + cos(pi * p)) / 2   p = (s - warmup) / (total - warmup)
  and final_lr after total_steps. The (s + 1) makes the first step's lr non-zero.
  """
  if peak_lr <= 0 or final_lr < 0 or final_lr > peak_lr:
    raise ValueError(f"lr: need 0 <= final_lr <= peak_lr and peak_lr > 0, got "
                     f"peak_lr={peak_lr}, final_lr={final_lr}")
  if warmup_steps < 0 or total_steps < warmup_steps:
    raise ValueError(f"warmup_steps: need 0 <= warmup_steps <= total_steps, got "
                     f"warmup_steps={warmup_steps}, total_steps={total_steps}")
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum((s + 1.0) / max(warmup_steps, 1), 1.0)
    p = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + jnp.cos(jnp.pi * p))
    return jnp.where(s < warmup_steps, warm, cos)

  return schedule
