"""Sliding-window (and causal) flash attention in Pallas, Triton/GPU lowering.

Mask: query i sees key j iff `i - window < j <= i` (LS-attention local heads,
arXiv 2505.15548); `window=None` is full causal (its global heads).

Block skipping. The forward kernel runs one program per (query block, batch,
head). Its rows are [qi*bq, qi*bq + bq), so the keys it can see are
[qi*bq - window + 1, qi*bq + bq - 1]. `kv_block_range` turns that interval into
the half-open range of key blocks [lo, hi): lo is the block holding the first
visible key of the block's first row, hi - 1 is the diagonal block. The inner
`lax.fori_loop` runs exactly over [lo, hi), so a program touches about
(window + bq) / bk key blocks instead of T / bk, and no fully masked block is
ever loaded. Only the (at most two) edge blocks actually need the mask; it is
applied to every visited block for simplicity (an elementwise `where`).

Online softmax (FlashAttention-2, Dao 2023, Alg. 1) in float32: running row
max m, running denominator l, unnormalized accumulator; masked entries get
probability exactly 0 (not exp(MASK - m)), so a row that is fully masked in an
early block contributes nothing and the finite initial m never produces NaNs.
Every real row sees at least its own key, so l > 0 at the end.

Backward (FlashAttention-2, Alg. 2, split into two kernels so that no atomics
are needed):
  * delta_i = sum_d dO_id * O_id is computed with XLA (elementwise + reduce).
  * dq kernel: one program per (query block, batch, head); loops over the same
    key-block range as the forward, recomputes P = exp(S - lse) and
    dS = P * (dP - delta), dq += dS K.
  * dk/dv kernel: one program per (key block, batch, kv head); `q_block_range`
    gives the query blocks that can see the key block: [kj*bk, kj*bk + bk - 1 +
    window - 1], i.e. again ~ (window + bk) / bq blocks. For GQA the program
    also loops over the `H / KVH` query heads of its kv head, so dk/dv are
    summed over the group in float32 inside the kernel.
  With a soft-cap, S = cap * tanh(S_raw / cap) and dS_raw = dS * (1 - tanh^2).

Layout and padding: inputs stay [B, T, H, D] (the BlockSpecs squeeze the head
axis). T is zero-padded to a multiple of lcm(block_q, block_k) and D to a power
of two >= 16 (Triton tiles are powers of two); padded keys are never visible
to real queries (they are in the future), padded rows are sliced off and their
zero cotangents contribute nothing to dk/dv. `lse` and `max_abs_logit` are
statistics: their gradient is stopped.

Verified (tests/pallas_kernels): interpret mode on CPU against the dense
`reference`, and lowering to Triton IR for the "cuda" platform on a CPU host.
Not yet compiled or timed on a real GPU. For MQA the dk/dv grid is only
(T / bk) x B programs wide, each looping over all H query heads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for the running max, so that m - m_new is never
# (-inf) - (-inf) = NaN. Masked probabilities are zeroed explicitly.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # smallest tile Triton's dot accepts


# ----------------------------------------------------------------------------
# Block ranges: pure helpers, shared by the kernels and the tests. They take
# Python ints (tests) or traced int32 scalars (kernels, from pl.program_id).


def _floordiv(a, b: int):
  # `//` on a traced program id does not lower on Triton; lax.div truncates,
  # which equals floor division for the non-negative values used here.
  return a // b if isinstance(a, int) else lax.div(a, jnp.int32(b))


def _max(a, b):
  return max(a, b) if isinstance(a, int) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) else jnp.minimum(a, b)


def kv_block_range(q_block, *, block_q: int, block_k: int, window: int | None,
                   num_kv_blocks: int):
  """Half-open range [lo, hi) of key blocks that query block `q_block` sees.

  A key block is in the range iff at least one (row, key) pair in it is
  visible; the tests check this is exact against brute force.
  """
  first_row = q_block * block_q
  last_row = first_row + block_q - 1
  if window is None:
    lo = 0 if isinstance(q_block, int) else jnp.int32(0)
  else:
    lo = _floordiv(_max(first_row - window + 1, 0), block_k)
  hi = _min(_floordiv(last_row, block_k) + 1, num_kv_blocks)
  return lo, hi


def q_block_range(kv_block, *, block_q: int, block_k: int, window: int | None,
                  num_q_blocks: int):
  """Half-open range [lo, hi) of query blocks that can see key block `kv_block`."""
  first_key = kv_block * block_k
  last_key = first_key + block_k - 1
  lo = _floordiv(first_key, block_q)
  if window is None:
    hi = num_q_blocks if isinstance(kv_block, int) else jnp.int32(num_q_blocks)
  else:
    # The last query that sees `last_key` is last_key + window - 1.
    hi = _min(_floordiv(last_key + window - 1, block_q) + 1, num_q_blocks)
  return lo, hi


# ----------------------------------------------------------------------------
# Kernels. Refs are 2-D [rows, Dp] tiles unless noted; all math in float32.


@dataclasses.dataclass(frozen=True)
class _Config:
  window: int | None
  soft_cap: float | None
  scale: float
  block_q: int
  block_k: int
  group: int  # H // KVH
  interpret: bool
  count_blocks: bool = False  # tests only: also return loop trip counts


def _visible(q_pos_Q, k_pos_K, window):
  vis_QxK = k_pos_K[None, :] <= q_pos_Q[:, None]
  if window is not None:
    vis_QxK &= k_pos_K[None, :] > q_pos_Q[:, None] - window
  return vis_QxK


def _logits(q_QxD, k_KxD, cfg: _Config):
  """Scaled (and soft-capped) logits plus tanh (for the cap's derivative)."""
  s_QxK = plgpu.dot(q_QxD, k_KxD, trans_b=True) * cfg.scale
  if cfg.soft_cap is None:
    return s_QxK, None
  # Soft-cap as in Gemma 2: cap * tanh(s / cap).
  t_QxK = jnp.tanh(s_QxK / cfg.soft_cap)
  return cfg.soft_cap * t_QxK, t_QxK


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, amax_ref, *count_ref,
                cfg: _Config, num_kv_blocks: int):
  bq, bk = cfg.block_q, cfg.block_k
  qi = pl.program_id(0)
  q_QxD = q_ref[...]
  q_pos_Q = qi * bq + jnp.arange(bq)
  lo, hi = kv_block_range(qi, block_q=bq, block_k=bk, window=cfg.window,
                          num_kv_blocks=num_kv_blocks)

  def body(kj, carry):
    acc_QxD, m_Q, l_Q, amax_Q, n = carry
    k_KxD = k_ref[pl.ds(kj * bk, bk), :]
    v_KxD = v_ref[pl.ds(kj * bk, bk), :]
    s_QxK, _ = _logits(q_QxD, k_KxD, cfg)
    vis_QxK = _visible(q_pos_Q, kj * bk + jnp.arange(bk), cfg.window)
    amax_Q = jnp.maximum(
        amax_Q, jnp.max(jnp.where(vis_QxK, jnp.abs(s_QxK), 0.0), axis=1))
    m_new_Q = jnp.maximum(
        m_Q, jnp.max(jnp.where(vis_QxK, s_QxK, _MASK_VALUE), axis=1))
    corr_Q = jnp.exp(m_Q - m_new_Q)
    p_QxK = jnp.where(vis_QxK, jnp.exp(s_QxK - m_new_Q[:, None]), 0.0)
    l_Q = corr_Q * l_Q + jnp.sum(p_QxK, axis=1)
    acc_QxD = corr_Q[:, None] * acc_QxD + plgpu.dot(
        p_QxK.astype(v_KxD.dtype), v_KxD)
    return acc_QxD, m_new_Q, l_Q, amax_Q, n + 1

  init = (jnp.zeros(q_QxD.shape, jnp.float32),
          jnp.full((bq,), _MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq,), jnp.float32),
          jnp.int32(0))
  acc_QxD, m_Q, l_Q, amax_Q, n = lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc_QxD / l_Q[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m_Q + jnp.log(l_Q)
  amax_ref[...] = amax_Q
  if count_ref:
    count_ref[0][...] = jnp.full((1,), n, jnp.int32)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config, num_kv_blocks: int):
  bq, bk = cfg.block_q, cfg.block_k
  qi = pl.program_id(0)
  q_QxD = q_ref[...]
  do_QxD = do_ref[...]
  lse_Q = lse_ref[...]
  delta_Q = delta_ref[...]
  q_pos_Q = qi * bq + jnp.arange(bq)
  lo, hi = kv_block_range(qi, block_q=bq, block_k=bk, window=cfg.window,
                          num_kv_blocks=num_kv_blocks)

  def body(kj, dq_QxD):
    k_KxD = k_ref[pl.ds(kj * bk, bk), :]
    v_KxD = v_ref[pl.ds(kj * bk, bk), :]
    s_QxK, t_QxK = _logits(q_QxD, k_KxD, cfg)
    vis_QxK = _visible(q_pos_Q, kj * bk + jnp.arange(bk), cfg.window)
    p_QxK = jnp.where(vis_QxK, jnp.exp(s_QxK - lse_Q[:, None]), 0.0)
    dp_QxK = plgpu.dot(do_QxD, v_KxD, trans_b=True)
    # Softmax backward (FlashAttention-2 Alg. 2): dS = P * (dP - delta).
    ds_QxK = p_QxK * (dp_QxK - delta_Q[:, None])
    if t_QxK is not None:
      ds_QxK = ds_QxK * (1.0 - t_QxK * t_QxK)
    return dq_QxD + plgpu.dot(ds_QxK.astype(k_KxD.dtype), k_KxD)

  dq_QxD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = (dq_QxD * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, cfg: _Config, num_q_blocks: int):
  # q_ref/do_ref: [Tp, G, Dp] (all query heads of this kv head);
  # lse_ref/delta_ref: [G, Tp]; k/v/dk/dv: [bk, Dp].
  bq, bk = cfg.block_q, cfg.block_k
  kj = pl.program_id(0)
  k_KxD = k_ref[...]
  v_KxD = v_ref[...]
  k_pos_K = kj * bk + jnp.arange(bk)
  lo, hi = q_block_range(kj, block_q=bq, block_k=bk, window=cfg.window,
                         num_q_blocks=num_q_blocks)

  def head_body(g, carry):
    def q_body(qi, carry):
      dk_KxD, dv_KxD = carry
      rows = pl.ds(qi * bq, bq)
      q_QxD = q_ref[rows, g, :]
      do_QxD = do_ref[rows, g, :]
      lse_Q = lse_ref[g, rows]
      delta_Q = delta_ref[g, rows]
      s_QxK, t_QxK = _logits(q_QxD, k_KxD, cfg)
      vis_QxK = _visible(qi * bq + jnp.arange(bq), k_pos_K, cfg.window)
      p_QxK = jnp.where(vis_QxK, jnp.exp(s_QxK - lse_Q[:, None]), 0.0)
      dv_KxD = dv_KxD + plgpu.dot(p_QxK.astype(do_QxD.dtype), do_QxD,
                                  trans_a=True)
      dp_QxK = plgpu.dot(do_QxD, v_KxD, trans_b=True)
      ds_QxK = p_QxK * (dp_QxK - delta_Q[:, None])
      if t_QxK is not None:
        ds_QxK = ds_QxK * (1.0 - t_QxK * t_QxK)
      dk_KxD = dk_KxD + plgpu.dot(ds_QxK.astype(q_QxD.dtype), q_QxD,
                                  trans_a=True)
      return dk_KxD, dv_KxD

    return lax.fori_loop(lo, hi, q_body, carry)

  zeros = jnp.zeros(k_KxD.shape, jnp.float32)
  dk_KxD, dv_KxD = lax.fori_loop(0, cfg.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk_KxD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: q [B,Tp,H,Dp], k/v [B,Tp,KVH,Dp].


def _compiler_params(dp: int, bq: int, bk: int):
  num_warps = 4 if dp <= 64 and bq * bk <= 128 * 128 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _forward(q, k, v, cfg: _Config):
  b, tp, h, dp = q.shape
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
  nq, nk = tp // bq, tp // bk
  q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, i, hi, 0))
  # GQA: query head hi reads kv head hi // g. The kv spec is the whole
  # sequence: on Triton it is only a base pointer; the loop loads the tiles.
  kv_spec = pl.BlockSpec((None, tp, None, dp),
                         lambda i, bi, hi: (bi, 0, hi // g, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  out_specs = [q_spec, stat_spec, stat_spec]
  if cfg.count_blocks:
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
    out_specs.append(
        pl.BlockSpec((None, None, 1), lambda i, bi, hi: (bi, hi, i)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, num_kv_blocks=nk),
      grid=(nq, b, h),
      in_specs=[q_spec, kv_spec, kv_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_fwd",
  )(q, k, v)


def _backward_dq(q, k, v, do, lse, delta, cfg: _Config):
  b, tp, h, dp = q.shape
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
  q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, tp, None, dp),
                         lambda i, bi, hi: (bi, 0, hi // g, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, num_kv_blocks=tp // bk),
      grid=(tp // bq, b, h),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_bwd_dq",
  )(q, k, v, do, lse, delta)


def _backward_dkdv(q, k, v, do, lse, delta, cfg: _Config):
  b, tp, kvh, dp = k.shape
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
  # All g query heads of kv head hi: head block of size g at block index hi.
  q_spec = pl.BlockSpec((None, tp, g, dp), lambda j, bi, hi: (bi, 0, hi, 0))
  kv_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bi, hi: (bi, j, hi, 0))
  stat_spec = pl.BlockSpec((None, g, tp), lambda j, bi, hi: (bi, hi, 0))
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, num_q_blocks=tp // bq),
      grid=(tp // bk, b, kvh),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_bwd_dkdv",
  )(q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
  return tuple(_forward(q, k, v, cfg))


def _flash_fwd(q, k, v, cfg: _Config):
  outs = tuple(_forward(q, k, v, cfg))
  o, lse = outs[0], outs[1]
  return outs, (q, k, v, o, lse)


def _flash_bwd(cfg: _Config, res, cotangents):
  q, k, v, o, lse = res
  do = cotangents[0]  # lse / max_abs / counts are statistics: no gradient.
  # delta_i = rowsum(dO * O) (FlashAttention-2 Alg. 2, line "D_i").
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32),
                     o.astype(jnp.float32))
  do = do.astype(q.dtype)
  dq = _backward_dq(q, k, v, do, lse, delta, cfg)
  dk, dv = _backward_dkdv(q, k, v, do, lse, delta, cfg)
  return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _validate(q, k, v, window, logits_soft_cap, block_q, block_k):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} vs "
                     f"{v.shape}")
  if q.shape[:2] != k.shape[:2]:
    raise ValueError(f"q and k must share [B, T]; got {q.shape[:2]} vs "
                     f"{k.shape[:2]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head dims of q and k/v must match; got {q.shape[3]} vs "
                     f"{k.shape[3]}")
  if q.shape[2] % k.shape[2] != 0:
    raise ValueError(f"num query heads H={q.shape[2]} must be a multiple of "
                     f"num kv heads KVH={k.shape[2]}")
  if window is not None and (not isinstance(window, (int, np.integer))
                             or isinstance(window, bool) or window < 1):
    raise ValueError(f"window must be None or an int >= 1; got {window!r}")
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be None or > 0; got "
                     f"{logits_soft_cap!r}")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk < _MIN_BLOCK or blk & (blk - 1):
      raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}; got "
                       f"{blk}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f"{name} dtype must be float32, bfloat16 or float16; "
                       f"got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")


def _padded_call(q, k, v, *, window, logits_soft_cap, block_q, block_k,
                 interpret, count_blocks):
  b, t, h, d = q.shape
  # Small T: shrink the tiles (kept powers of two) instead of padding to 128.
  t_pow2 = max(_MIN_BLOCK, pl.next_power_of_2(t))
  bq, bk = min(block_q, t_pow2), min(block_k, t_pow2)
  tile = math.lcm(bq, bk)
  tp = pl.cdiv(t, tile) * tile
  dp = max(_MIN_BLOCK, pl.next_power_of_2(d))
  window = None if window is None else int(window)
  if window is not None and window >= t:
    window = None  # every causal key is inside the window: skip the compare
  cfg = _Config(window=window, soft_cap=logits_soft_cap,
                scale=1.0 / math.sqrt(d), block_q=bq, block_k=bk,
                group=h // k.shape[2], interpret=interpret,
                count_blocks=count_blocks)
  pad = ((0, 0), (0, tp - t), (0, 0), (0, dp - d))
  outs = _flash(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), cfg)
  out = outs[0][:, :t, :, :d]
  lse = lax.stop_gradient(outs[1][:, :, :t])
  amax = lax.stop_gradient(outs[2][:, :, :t])
  if count_blocks:
    return out, lse, amax, outs[3]
  return out, lse, amax


@functools.partial(jax.jit, static_argnames=(
    "window", "logits_soft_cap", "block_q", "block_k", "interpret"))
def windowed_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int | None,
    logits_soft_cap: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Causal sliding-window flash attention (Pallas, Triton/GPU lowering).

  Args:
    q: [B, T, H, D] queries; k, v: [B, T, KVH, D] with H % KVH == 0.
    window: query i sees key j iff i - window < j <= i; None = full causal.
    logits_soft_cap: if set, logits become cap * tanh(logits / cap).
    block_q, block_k: tile sizes (powers of two >= 16; shrunk for small T).
    interpret: run the kernels in Pallas interpret mode (CPU, tests).

  Returns:
    out [B, T, H, D] in q.dtype (differentiable wrt q, k, v), lse [B, H, T]
    float32 and max_abs_logit [B, H, T] float32 (statistics, no gradient).
  """
  _validate(q, k, v, window, logits_soft_cap, block_q, block_k)
  return _padded_call(q, k, v, window=window, logits_soft_cap=logits_soft_cap,
                      block_q=block_q, block_k=block_k, interpret=interpret,
                      count_blocks=False)


def visited_kv_blocks(q, k, v, *, window, block_q, block_k,
                      logits_soft_cap=None, interpret=True) -> jax.Array:
  """[B, H, T_pad / block_q] int32: key blocks each forward program visited.

  Counted by the kernel's own loop (a trip counter in the carry); for tests.
  """
  _validate(q, k, v, window, logits_soft_cap, block_q, block_k)
  return _padded_call(q, k, v, window=window, logits_soft_cap=logits_soft_cap,
                      block_q=block_q, block_k=block_k, interpret=interpret,
                      count_blocks=True)[3]
