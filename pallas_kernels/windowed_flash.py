"""Sliding-window (and causal) flash attention in Pallas, Triton/GPU lowering.

Mask: query i sees key j iff `start_B[b] <= j`, `j <= i` and, for a local head
(`head < num_local_heads`), `i - window < j` (LS-attention, arXiv 2505.15548:
local heads see a causal window, global heads all causal keys). `start_B`
masks left padding; rows that see no key at all output 0 (lse `_EMPTY_LSE`).

One launch for all heads. The forward grid is (query block, batch, head); the
head's window is chosen inside the kernel from `pl.program_id(2)`, so q, k, v
are never sliced, gathered or repeated (GQA: query head h reads kv head
h // G through the BlockSpec index map).

Block skipping. A forward program's rows are [qi*bq, qi*bq + bq), so the keys
it can see are [max(qi*bq - window + 1, start), qi*bq + bq - 1].
`kv_block_range` turns the window part into the half-open range of key blocks
[lo, hi) (hi - 1 is the diagonal block); the kernel raises lo to
start // bk. The inner `lax.fori_loop` runs exactly over [lo, hi), so a local
program touches about (window + bq) / bk key blocks instead of T / bk, and no
fully masked block is ever loaded. The mask is applied to every visited block
(an elementwise `where`).

Online softmax (FlashAttention-2, Dao 2023, Alg. 1) in float32: running row
max m, running denominator l, unnormalized accumulator; masked entries get
probability exactly 0 (not exp(MASK - m)), so a row that is fully masked in an
early block contributes nothing and the finite initial m never produces NaNs.
A row with l == 0 at the end saw no key (left padding): it outputs 0.

Statistics only when asked: `return_stats=True` turns on (statically) the
running max |logit| in the forward loop and returns it with the lse; without it
the loop carries no extra state. The lse itself is always written: it is the
backward's residual.

Backward (FlashAttention-2, Alg. 2, two kernels, no atomics), with its own
tile sizes (default 64 x 64, which compiles for sm_90a without register
spills where the forward's 128 x 128 spilled; see the issue 9 note):
  * delta_i = sum_d dO_id * O_id is computed with XLA (elementwise + reduce).
  * dq kernel: one program per (query block, batch, head); loops over the same
    key-block range as the forward, recomputes P = exp(S - lse) and
    dS = P * (dP - delta), dq += dS K.
  * dk/dv kernel: one program per (key block, batch, QUERY head);
    `q_block_range` gives the query blocks that can see the key block. Each
    program writes the float32 dk/dv contribution of its own query head; the
    G query heads of a kv head are then summed with one XLA reduce. So the grid
    is (T / bk) x B x H wide even for MQA, instead of (T / bk) x B x KVH with a
    serial loop over G heads.
  With a soft-cap, S = cap * tanh(S_raw / cap) and dS_raw = dS * (1 - tanh^2).

Layout and padding: inputs stay [B, T, H, D] (the BlockSpecs squeeze the head
axis). T is zero-padded to a multiple of every tile and D to a power of two
>= 16 (Triton tiles are powers of two); padded keys are never visible to real
queries (they are in the future), padded rows are sliced off and their zero
cotangents contribute nothing to dk/dv. `lse` and `max_abs_logit` are
statistics: their gradient is stopped.

Verified (tests/pallas_kernels): interpret mode on CPU against the dense
`reference`, and lowering to Triton IR for the "cuda" platform on a CPU host.
Not yet compiled or timed on a real GPU by this repo's tests;
benchmarks/accelerator_check.py does that on a machine with one.
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
# lse of a row that sees no key: exp(s - _EMPTY_LSE) underflows to 0 for any
# finite logit, so even an unmasked recomputation gives probability 0.
_EMPTY_LSE = 0.7 * float(np.finfo(np.float32).max)


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
  window: int | None  # None: no head has a window (all causal)
  num_local: int      # heads [0, num_local) use `window`; the rest are causal
  num_heads: int
  soft_cap: float | None
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  group: int  # H // KVH
  padded: bool  # a start_B array is passed (left padding)
  with_amax: bool  # compute max |logit| (statistics asked for)
  interpret: bool
  count_blocks: bool = False  # tests only: also return loop trip counts

  @property
  def mixed(self) -> bool:
    """Some heads local, some global: the window is chosen per program."""
    return self.window is not None and 0 < self.num_local < self.num_heads

  def head_window(self, head):
    """(window or None, is_local flag or None) for the program's head."""
    if self.window is None or self.num_local == 0:
      return None, None
    if self.num_local >= self.num_heads:
      return self.window, None
    return self.window, head < self.num_local


def _visible(q_pos_Q, k_pos_K, window, is_local, start):
  vis_QxK = k_pos_K[None, :] <= q_pos_Q[:, None]
  if window is not None:
    in_window_QxK = k_pos_K[None, :] > q_pos_Q[:, None] - window
    if is_local is not None:  # mixed heads: only local heads are windowed
      in_window_QxK = in_window_QxK | jnp.logical_not(is_local)
    vis_QxK &= in_window_QxK
  if start is not None:
    vis_QxK &= k_pos_K[None, :] >= start
  return vis_QxK


def _kv_range(qi, head, start, cfg: _Config, bq: int, bk: int, nk: int):
  """Key blocks [lo, hi) a (query block, head) program visits."""
  window, is_local = cfg.head_window(head)
  lo, hi = kv_block_range(qi, block_q=bq, block_k=bk, window=window,
                          num_kv_blocks=nk)
  if is_local is not None:
    lo = jnp.where(is_local, lo, 0)
  if start is not None:
    lo = jnp.maximum(lo, lax.div(start, jnp.int32(bk)))
  return lo, hi


def _q_range(kj, head, start, cfg: _Config, bq: int, bk: int, nq: int):
  """Query blocks [lo, hi) that can see key block kj of the program's head."""
  window, is_local = cfg.head_window(head)
  lo, hi = q_block_range(kj, block_q=bq, block_k=bk, window=window,
                         num_q_blocks=nq)
  if is_local is not None:
    hi = jnp.where(is_local, hi, nq)
  if start is not None:
    # A visible pair has q >= k >= start; a key block wholly before start is
    # seen by nobody.
    lo = jnp.maximum(lo, lax.div(start, jnp.int32(bq)))
    hi = jnp.where(kj * bk + bk - 1 < start, lo, hi)
  return lo, hi


def _logits(q_QxD, k_KxD, cfg: _Config):
  """Scaled (and soft-capped) logits plus tanh (for the cap's derivative)."""
  s_QxK = plgpu.dot(q_QxD, k_KxD, trans_b=True) * cfg.scale
  if cfg.soft_cap is None:
    return s_QxK, None
  # Soft-cap as in Gemma 2: cap * tanh(s / cap).
  t_QxK = jnp.tanh(s_QxK / cfg.soft_cap)
  return cfg.soft_cap * t_QxK, t_QxK


def _split_refs(refs, cfg: _Config, n_in: int):
  """(start_ref or None, inputs, outputs) from a kernel's positional refs."""
  if cfg.padded:
    return refs[0], refs[1:n_in + 1], refs[n_in + 1:]
  return None, refs[:n_in], refs[n_in:]


def _fwd_kernel(*refs, cfg: _Config, num_kv_blocks: int):
  start_ref, (q_ref, k_ref, v_ref), outs = _split_refs(refs, cfg, 3)
  o_ref, lse_ref, *outs = outs
  amax_ref = outs.pop(0) if cfg.with_amax else None
  count_ref = outs.pop(0) if cfg.count_blocks else None
  bq, bk = cfg.block_q, cfg.block_k
  qi, head = pl.program_id(0), pl.program_id(2)
  start = None if start_ref is None else start_ref[...]
  window, is_local = cfg.head_window(head)
  q_QxD = q_ref[...]
  q_pos_Q = qi * bq + jnp.arange(bq)
  lo, hi = _kv_range(qi, head, start, cfg, bq, bk, num_kv_blocks)

  def body(kj, carry):
    acc_QxD, m_Q, l_Q, n, *amax = carry
    k_KxD = k_ref[pl.ds(kj * bk, bk), :]
    v_KxD = v_ref[pl.ds(kj * bk, bk), :]
    s_QxK, _ = _logits(q_QxD, k_KxD, cfg)
    vis_QxK = _visible(q_pos_Q, kj * bk + jnp.arange(bk), window, is_local,
                       start)
    if cfg.with_amax:
      amax = [jnp.maximum(
          amax[0], jnp.max(jnp.where(vis_QxK, jnp.abs(s_QxK), 0.0), axis=1))]
    m_new_Q = jnp.maximum(
        m_Q, jnp.max(jnp.where(vis_QxK, s_QxK, _MASK_VALUE), axis=1))
    corr_Q = jnp.exp(m_Q - m_new_Q)
    p_QxK = jnp.where(vis_QxK, jnp.exp(s_QxK - m_new_Q[:, None]), 0.0)
    l_Q = corr_Q * l_Q + jnp.sum(p_QxK, axis=1)
    acc_QxD = corr_Q[:, None] * acc_QxD + plgpu.dot(
        p_QxK.astype(v_KxD.dtype), v_KxD)
    return (acc_QxD, m_new_Q, l_Q, n + 1, *amax)

  init = (jnp.zeros(q_QxD.shape, jnp.float32),
          jnp.full((bq,), _MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32),
          jnp.int32(0))
  if cfg.with_amax:
    init += (jnp.zeros((bq,), jnp.float32),)
  acc_QxD, m_Q, l_Q, n, *amax = lax.fori_loop(lo, hi, body, init)
  seen_Q = l_Q > 0.0  # False: the row saw no key (left padding)
  l_safe_Q = jnp.where(seen_Q, l_Q, 1.0)
  o_ref[...] = (acc_QxD / l_safe_Q[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen_Q, m_Q + jnp.log(l_safe_Q), _EMPTY_LSE)
  if cfg.with_amax:
    amax_ref[...] = amax[0]
  if cfg.count_blocks:
    count_ref[...] = jnp.full((1,), n, jnp.int32)


def _dq_kernel(*refs, cfg: _Config, num_kv_blocks: int):
  start_ref, ins, (dq_ref,) = _split_refs(refs, cfg, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  qi, head = pl.program_id(0), pl.program_id(2)
  start = None if start_ref is None else start_ref[...]
  window, is_local = cfg.head_window(head)
  q_QxD = q_ref[...]
  do_QxD = do_ref[...]
  lse_Q = lse_ref[...]
  delta_Q = delta_ref[...]
  q_pos_Q = qi * bq + jnp.arange(bq)
  lo, hi = _kv_range(qi, head, start, cfg, bq, bk, num_kv_blocks)

  def body(kj, dq_QxD):
    k_KxD = k_ref[pl.ds(kj * bk, bk), :]
    v_KxD = v_ref[pl.ds(kj * bk, bk), :]
    s_QxK, t_QxK = _logits(q_QxD, k_KxD, cfg)
    vis_QxK = _visible(q_pos_Q, kj * bk + jnp.arange(bk), window, is_local,
                       start)
    p_QxK = jnp.where(vis_QxK, jnp.exp(s_QxK - lse_Q[:, None]), 0.0)
    dp_QxK = plgpu.dot(do_QxD, v_KxD, trans_b=True)
    # Softmax backward (FlashAttention-2 Alg. 2): dS = P * (dP - delta).
    ds_QxK = p_QxK * (dp_QxK - delta_Q[:, None])
    if t_QxK is not None:
      ds_QxK = ds_QxK * (1.0 - t_QxK * t_QxK)
    return dq_QxD + plgpu.dot(ds_QxK.astype(k_KxD.dtype), k_KxD)

  dq_QxD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = (dq_QxD * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Config, num_q_blocks: int):
  # q_ref/do_ref: [Tp, Dp] (the whole sequence of this query head);
  # lse_ref/delta_ref: [Tp]; k/v: [bk, Dp] of its kv head; dk/dv: [bk, Dp]
  # partial sums of this query head.
  start_ref, ins, (dk_ref, dv_ref) = _split_refs(refs, cfg, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  kj, head = pl.program_id(0), pl.program_id(2)
  start = None if start_ref is None else start_ref[...]
  window, is_local = cfg.head_window(head)
  k_KxD = k_ref[...]
  v_KxD = v_ref[...]
  k_pos_K = kj * bk + jnp.arange(bk)
  lo, hi = _q_range(kj, head, start, cfg, bq, bk, num_q_blocks)

  def body(qi, carry):
    dk_KxD, dv_KxD = carry
    rows = pl.ds(qi * bq, bq)
    q_QxD = q_ref[rows, :]
    do_QxD = do_ref[rows, :]
    lse_Q = lse_ref[rows]
    delta_Q = delta_ref[rows]
    s_QxK, t_QxK = _logits(q_QxD, k_KxD, cfg)
    vis_QxK = _visible(qi * bq + jnp.arange(bq), k_pos_K, window, is_local,
                       start)
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

  zeros = jnp.zeros(k_KxD.shape, jnp.float32)
  dk_KxD, dv_KxD = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk_KxD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: q [B,Tp,H,Dp], k/v [B,Tp,KVH,Dp],
# start [B] int32 (only when cfg.padded).


def _compiler_params(dp: int, bq: int, bk: int):
  num_warps = 4 if dp <= 64 or bq * bk <= 64 * 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _start_spec():
  # One int32 per batch row; the squeezed block is a scalar ref.
  return pl.BlockSpec((None,), lambda i, bi, hi: (bi,))


def _with_start(cfg, start, in_specs, args):
  if not cfg.padded:
    return in_specs, args
  return [_start_spec()] + in_specs, (start,) + tuple(args)


def _forward(q, k, v, start, cfg: _Config):
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
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  out_specs = [q_spec, stat_spec]
  if cfg.with_amax:
    out_shape.append(jax.ShapeDtypeStruct((b, h, tp), jnp.float32))
    out_specs.append(stat_spec)
  if cfg.count_blocks:
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
    out_specs.append(
        pl.BlockSpec((None, None, 1), lambda i, bi, hi: (bi, hi, i)))
  in_specs, args = _with_start(cfg, start, [q_spec, kv_spec, kv_spec],
                               (q, k, v))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, num_kv_blocks=nk),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_fwd",
  )(*args)


def _backward_dq(q, k, v, do, lse, delta, start, cfg: _Config):
  b, tp, h, dp = q.shape
  bq, bk, g = cfg.block_q_bwd, cfg.block_k_bwd, cfg.group
  q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, tp, None, dp),
                         lambda i, bi, hi: (bi, 0, hi // g, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  in_specs, args = _with_start(
      cfg, start, [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec],
      (q, k, v, do, lse, delta))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, num_kv_blocks=tp // bk),
      grid=(tp // bq, b, h),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_bwd_dq",
  )(*args)


def _backward_dkdv(q, k, v, do, lse, delta, start, cfg: _Config):
  b, tp, h, dp = q.shape
  kvh = k.shape[2]
  bq, bk, g = cfg.block_q_bwd, cfg.block_k_bwd, cfg.group
  # Grid over QUERY heads: program (j, bi, hi) reads query head hi and its kv
  # head hi // g, and writes query head hi's share of dk/dv.
  q_spec = pl.BlockSpec((None, tp, None, dp), lambda j, bi, hi: (bi, 0, hi, 0))
  kv_spec = pl.BlockSpec((None, bk, None, dp),
                         lambda j, bi, hi: (bi, j, hi // g, 0))
  out_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bi, hi: (bi, j, hi, 0))
  stat_spec = pl.BlockSpec((None, None, tp), lambda j, bi, hi: (bi, hi, 0))
  # G == 1: each program owns its kv head's tile, write the final dtype
  # directly; otherwise float32 partials, summed over the group below.
  part_dtype = k.dtype if g == 1 else jnp.float32
  in_specs, args = _with_start(
      cfg, start, [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec],
      (q, k, v, do, lse, delta))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, num_q_blocks=tp // bq),
      grid=(tp // bk, b, h),
      in_specs=in_specs,
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, dp), part_dtype)] * 2,
      compiler_params=_compiler_params(dp, bq, bk),
      interpret=cfg.interpret,
      name="windowed_flash_bwd_dkdv",
  )(*args)
  if g > 1:
    dk = dk.reshape(b, tp, kvh, g, dp).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(b, tp, kvh, g, dp).sum(axis=3).astype(v.dtype)
  return dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, start, cfg: _Config):
  return tuple(_forward(q, k, v, start, cfg))


def _flash_fwd(q, k, v, start, cfg: _Config):
  outs = tuple(_forward(q, k, v, start, cfg))
  o, lse = outs[0], outs[1]
  return outs, (q, k, v, start, o, lse)


def _flash_bwd(cfg: _Config, res, cotangents):
  q, k, v, start, o, lse = res
  do = cotangents[0]  # lse / max_abs / counts are statistics: no gradient.
  # delta_i = rowsum(dO * O) (FlashAttention-2 Alg. 2, line "D_i"); a
  # multiply-reduce (one fusion), not a batched dot.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32),
                  axis=-1).transpose(0, 2, 1)
  do = do.astype(q.dtype)
  dq = _backward_dq(q, k, v, do, lse, delta, start, cfg)
  dk, dv = _backward_dkdv(q, k, v, do, lse, delta, start, cfg)
  dstart = None if start is None else np.zeros(start.shape, jax.dtypes.float0)
  return dq, dk, dv, dstart


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _check_block(name, blk):
  if isinstance(blk, bool) or not isinstance(blk, (int, np.integer)) \
      or blk < _MIN_BLOCK or blk & (blk - 1):
    raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}; got "
                     f"{blk!r}")


def _validate(q, k, v, window, num_local_heads, start_B, logits_soft_cap,
              blocks):
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
  if num_local_heads is not None and (
      isinstance(num_local_heads, bool)
      or not isinstance(num_local_heads, (int, np.integer))
      or not 0 <= num_local_heads <= q.shape[2]):
    raise ValueError(f"num_local_heads must be None or an int in "
                     f"[0, H={q.shape[2]}]; got {num_local_heads!r}")
  if start_B is not None and tuple(jnp.shape(start_B)) != (q.shape[0],):
    raise ValueError(f"start_B must have shape [B]=({q.shape[0]},); got "
                     f"{tuple(jnp.shape(start_B))}")
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be None or > 0; got "
                     f"{logits_soft_cap!r}")
  for name, blk in blocks.items():
    _check_block(name, blk)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f"{name} dtype must be float32, bfloat16 or float16; "
                       f"got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")


def _padded_call(q, k, v, start_B, *, window, num_local_heads, logits_soft_cap,
                 block_q, block_k, block_q_bwd, block_k_bwd, return_stats,
                 interpret, count_blocks):
  b, t, h, d = q.shape
  # Small T: shrink the tiles (kept powers of two) instead of padding to 128.
  t_pow2 = max(_MIN_BLOCK, pl.next_power_of_2(t))
  bq, bk, bqb, bkb = (min(x, t_pow2) for x in
                      (block_q, block_k, block_q_bwd, block_k_bwd))
  tile = math.lcm(bq, bk, bqb, bkb)
  tp = pl.cdiv(t, tile) * tile
  dp = max(_MIN_BLOCK, pl.next_power_of_2(d))
  num_local = h if num_local_heads is None else int(num_local_heads)
  window = None if window is None else int(window)
  if window is not None and window >= t:
    window = None  # every causal key is inside the window: skip the compare
  cfg = _Config(window=window, num_local=num_local if window else 0,
                num_heads=h, soft_cap=logits_soft_cap, scale=1.0 / math.sqrt(d),
                block_q=bq, block_k=bk, block_q_bwd=bqb, block_k_bwd=bkb,
                group=h // k.shape[2], padded=start_B is not None,
                with_amax=return_stats, interpret=interpret,
                count_blocks=count_blocks)
  pad = ((0, 0), (0, tp - t), (0, 0), (0, dp - d))
  start = None
  if start_B is not None:
    # Clamped to [0, T]: start_B = T masks the whole row (it outputs 0).
    start = jnp.clip(jnp.asarray(start_B, jnp.int32), 0, t)
  outs = _flash(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), start, cfg)
  out = outs[0][:, :t, :, :d]
  if count_blocks:
    return outs[-1]
  if not return_stats:
    return out
  lse = lax.stop_gradient(outs[1][:, :, :t])
  amax = lax.stop_gradient(outs[2][:, :, :t])
  return out, lse, amax


@functools.partial(jax.jit, static_argnames=(
    "window", "num_local_heads", "logits_soft_cap", "block_q", "block_k",
    "block_q_bwd", "block_k_bwd", "return_stats", "interpret"))
def windowed_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    start_B: jax.Array | None = None,
    *,
    window: int | None,
    num_local_heads: int | None = None,
    logits_soft_cap: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    block_q_bwd: int = 64,
    block_k_bwd: int = 64,
    return_stats: bool = False,
    interpret: bool = False,
):
  """Causal sliding-window flash attention (Pallas, Triton/GPU lowering).

  Args:
    q: [B, T, H, D] queries; k, v: [B, T, KVH, D] with H % KVH == 0.
    start_B: optional int [B]; keys before start_B[b] are masked (left
      padding). Rows that see no key output 0.
    window: a local head's query i sees key j iff i - window < j <= i;
      None = every head full causal.
    num_local_heads: heads [0, num_local_heads) use `window`, the rest are
      causal (LS-attention); None = all heads local.
    logits_soft_cap: if set, logits become cap * tanh(logits / cap).
    block_q, block_k: forward tiles; block_q_bwd, block_k_bwd: backward tiles
      (powers of two >= 16; shrunk for small T).
    return_stats: also return lse and max |logit| (computed in the kernel only
      then).
    interpret: run the kernels in Pallas interpret mode (CPU, tests).

  Returns:
    out [B, T, H, D] in q.dtype (differentiable wrt q, k, v); with
    return_stats, (out, lse [B, H, T] float32, max_abs_logit [B, H, T]
    float32), statistics without gradient. A row that sees no key has lse
    `_EMPTY_LSE` and max_abs_logit 0.
  """
  blocks = dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                block_k_bwd=block_k_bwd)
  _validate(q, k, v, window, num_local_heads, start_B, logits_soft_cap, blocks)
  return _padded_call(q, k, v, start_B, window=window,
                      num_local_heads=num_local_heads,
                      logits_soft_cap=logits_soft_cap, return_stats=return_stats,
                      interpret=interpret, count_blocks=False, **blocks)


def visited_kv_blocks(q, k, v, start_B=None, *, window, block_q, block_k,
                      num_local_heads=None, logits_soft_cap=None,
                      interpret=True) -> jax.Array:
  """[B, H, T_pad / block_q] int32: key blocks each forward program visited.

  Counted by the kernel's own loop (a trip counter in the carry); for tests.
  """
  blocks = dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q,
                block_k_bwd=block_k)
  _validate(q, k, v, window, num_local_heads, start_B, logits_soft_cap, blocks)
  return _padded_call(q, k, v, start_B, window=window,
                      num_local_heads=num_local_heads,
                      logits_soft_cap=logits_soft_cap, return_stats=False,
                      interpret=interpret, count_blocks=True, **blocks)
