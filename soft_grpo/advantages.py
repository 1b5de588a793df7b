"""Group-relative advantages (GRPO), as in verl `compute_grpo_outcome_advantage`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# verl core_algos.py: `(scores - mean) / (std + epsilon)` with epsilon=1e-6.
ADVANTAGE_EPS = 1e-6


def group_advantages(rewards, group_size: int) -> jax.Array:
  """(R - mean_group) / (std_group + 1e-6), unbiased std (ddof=1).

  Args:
    rewards: [B] with B = P * group_size, groups contiguous (prompt-major:
      rewards[p * G:(p + 1) * G] are the G samples of prompt p).
    group_size: G >= 2 (the unbiased std needs two samples).
  Returns:
    [B] float32 advantages (one per response; broadcast to its tokens with
    `broadcast_to_tokens`).
  """
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"group_size={group_size!r} must be an int >= 2")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [B], got shape {rewards.shape}")
  if rewards.shape[0] % group_size:
    raise ValueError(
        f"len(rewards)={rewards.shape[0]} is not a multiple of group_size={group_size}")
  r_PxG = rewards.reshape(-1, group_size)
  mean_P = jnp.mean(r_PxG, axis=-1, keepdims=True)
  std_P = jnp.std(r_PxG, axis=-1, keepdims=True, ddof=1)
  return ((r_PxG - mean_P) / (std_P + ADVANTAGE_EPS)).reshape(-1)


def broadcast_to_tokens(advantages_B: jax.Array, response_mask_BxT: jax.Array) -> jax.Array:
  """Every response token of sample b gets advantage[b]; masked tokens get 0."""
  return advantages_B[:, None] * response_mask_BxT.astype(jnp.float32)
