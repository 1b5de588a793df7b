"""AdaGC: adaptive per-tensor gradient clipping (Wang et al., arXiv 2502.11034), as an optax
GradientTransformation of its own.

Each parameter tensor i keeps gamma_i, an EMA of its own *clipped* gradient norm. At step t
(AdaGC paper, Sec. 3, Algorithm 1):

  warm-up, t < T_start (global clipping with the absolute threshold lambda_abs):
    h_t        = min(lambda_abs / ||g_t||, 1)                     (||g_t||: global norm)
    ghat_{t,i} = h_t * g_{t,i}
    gamma_{t,i} = min(gamma_{t-1,i}, ||ghat_{t,i}||),   gamma_{0,i} = +inf
  afterwards (per-tensor, relative to the tensor's own history):
    h_{t,i}    = min(lambda_rel * gamma_{t-1,i} / ||g_{t,i}||, 1)
    ghat_{t,i} = h_{t,i} * g_{t,i}
    gamma_{t,i} = beta * gamma_{t-1,i} + (1 - beta) * ||ghat_{t,i}||

Defaults follow the paper: lambda_rel = 1.05, beta = 0.98, T_start = 100. A tensor's
abnormal gradient is cut to lambda_rel x its recent norm before it reaches Adam's moments,
without shrinking the other tensors (global clipping would shrink them all).
With warmup_steps = 0 the EMA starts at the first step's norm instead of +inf.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdaGCState(NamedTuple):
  count: jax.Array        # int32 []: steps taken
  gamma: Any              # like params, float32 [] leaves: EMA of each tensor's clipped norm
  num_clipped: jax.Array  # int32 []: tensors whose gradient was scaled down at the last step


def _norm(x) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def adagc(lambda_rel: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
          lambda_abs: float | None = 1.0, eps: float = 1e-12) -> optax.GradientTransformation:
  """AdaGC clipping; chain it before the optimizer (e.g. `optax.chain(adagc(), adamw(...))`).

  lambda_abs: the global-norm threshold of the warm-up steps (None or <= 0: no clipping then).
  """
  if lambda_rel <= 0:
    raise ValueError(f"lambda_rel: must be > 0, got {lambda_rel}")
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"beta: must be in [0, 1), got {beta}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
  use_abs = lambda_abs is not None and lambda_abs > 0

  def init_fn(params):
    gamma = jax.tree.map(lambda _: jnp.full((), jnp.inf, jnp.float32), params)
    return AdaGCState(count=jnp.zeros((), jnp.int32), gamma=gamma,
                      num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    gammas = treedef.flatten_up_to(state.gamma)
    norms = [_norm(g) for g in leaves]
    in_warmup = state.count < warmup_steps
    if use_abs:
      global_norm = jnp.sqrt(sum(jnp.square(n) for n in norms))
      h_global = jnp.minimum(lambda_abs / jnp.maximum(global_norm, eps), 1.0)
    else:
      h_global = jnp.ones((), jnp.float32)
    new_leaves, new_gammas, clipped = [], [], []
    for g, n, gam in zip(leaves, norms, gammas):
      h_local = jnp.minimum(lambda_rel * gam / jnp.maximum(n, eps), 1.0)  # inf gamma -> 1
      h = jnp.where(in_warmup, h_global, h_local)
      n_hat = h * n
      ema = jnp.where(jnp.isinf(gam), n_hat, beta * gam + (1.0 - beta) * n_hat)
      new_gammas.append(jnp.where(in_warmup, jnp.minimum(gam, n_hat), ema))
      new_leaves.append((g * h.astype(g.dtype)).astype(g.dtype))
      clipped.append((h < 1.0).astype(jnp.int32))
    new_state = AdaGCState(count=optax.safe_int32_increment(state.count),
                           gamma=treedef.unflatten(new_gammas),
                           num_clipped=sum(clipped, jnp.zeros((), jnp.int32)))
    return treedef.unflatten(new_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)
