"""Row-wise max |logit| over visible keys, as a small Pallas TPU (Mosaic) kernel.

The LS-attention paper's instability diagnostic (arXiv 2505.15548) needs max |q.k| per row.
Splash attention returns only the log-sum-exp, so on TPU this kernel recomputes the logits of
the *visible* key blocks only (same block skipping as the attention: a local head reads about
(window + block_q) / block_k key blocks per query block) and keeps a running max. It is a
kernel, not an XLA score pass, and it runs only when statistics are asked for.

Layout: q [B, H, T, D] (already scaled, as splash sees it), k [B, KVH, T, D]; T a multiple of
both blocks. Grid (B, H, query block, key step). The key block of step j is lo + j, clamped to
the last visible block (a repeated block index is not fetched again), and steps past the last
visible block are skipped with `pl.when`. The logits are computed transposed, [keys, queries],
so that the row max reduces over sublanes and lands lane-major in the [1, block_q] output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _div(a, b: int):
  # lax.div truncates; equal to floor division for the non-negative values here, and unlike
  # jnp's `//` it needs no sign fix-up (which Mosaic lowers only on a real TPU).
  return lax.div(a, jnp.int32(b))


def _range(qi, start, *, bq, bk, window, nk):
  first_row = qi * bq
  hi = jnp.minimum(_div(first_row + bq - 1, bk) + 1, nk)
  lo = jnp.int32(0) if window is None else _div(jnp.maximum(first_row - window + 1, 0), bk)
  lo = jnp.maximum(lo, _div(start, bk))
  return lo, hi


def _kernel(start_ref, q_ref, k_ref, o_ref, *, bq, bk, window, soft_cap, nk):
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  start = start_ref[b]
  lo, hi = _range(qi, start, bq=bq, bk=bk, window=window, nk=nk)
  kj = lo + j

  @pl.when(j == 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  @pl.when(kj < hi)
  def _():
    s_KxQ = lax.dot_general(k_ref[...], q_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if soft_cap is not None:
      s_KxQ = soft_cap * jnp.tanh(s_KxQ / soft_cap)  # Gemma-2 soft-cap
    k_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    vis = (k_pos <= q_pos) & (k_pos >= start)
    if window is not None:
      vis &= k_pos > q_pos - window
    row_max_1xQ = jnp.max(jnp.where(vis, jnp.abs(s_KxQ), 0.0), axis=0, keepdims=True)
    o_ref[...] = jnp.maximum(o_ref[...], row_max_1xQ)


@functools.partial(jax.jit, static_argnames=("window", "soft_cap", "block_q", "block_k",
                                             "interpret"))
def max_abs_logit(q_BxHxTxD, k_BxKxTxD, start_B, *, window: int | None, soft_cap=None,
                  block_q: int, block_k: int, interpret=False) -> jax.Array:
  """[B, H, T] float32: max |logit| over the keys each row sees (0 for rows that see none).

  Logits are q.k (q already scaled) after the optional soft-cap; key j is visible to row i
  iff start_B[b] <= j <= i and (window is None or j > i - window).
  """
  b, h, t, d = q_BxHxTxD.shape
  g = h // k_BxKxTxD.shape[1]
  if t % block_q or t % block_k:
    raise ValueError(f"max_abs_logit: T={t} must be a multiple of block_q={block_q} and "
                     f"block_k={block_k}")
  nq, nk = t // block_q, t // block_k
  steps = nk if window is None else min(nk, -(-(window - 1 + block_q) // block_k) + 1)
  rng = functools.partial(_range, bq=block_q, bk=block_k, window=window, nk=nk)

  def k_map(bi, hi, qi, j, start_ref):
    lo, last = rng(qi, start_ref[bi])
    return bi, _div(hi, g), jnp.maximum(jnp.minimum(lo + j, last - 1), 0), 0

  out = pl.pallas_call(
      functools.partial(_kernel, bq=block_q, bk=block_k, window=window, soft_cap=soft_cap,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, steps),
          in_specs=[pl.BlockSpec((None, None, block_q, d), lambda bi, hi, qi, j, s: (bi, hi, qi, 0)),
                    pl.BlockSpec((None, None, block_k, d), k_map)],
          out_specs=pl.BlockSpec((None, None, 1, block_q), lambda bi, hi, qi, j, s: (bi, hi, 0, qi)),
      ),
      out_shape=jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="ls_max_abs_logit",
  )(jnp.asarray(start_B, jnp.int32), q_BxHxTxD, k_BxKxTxD)
  return out[:, :, 0, :]
