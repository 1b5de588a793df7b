"""windowed_flash_attention (Pallas interpret mode) against the dense reference.

Tolerances: float32 <= 2e-5 max-abs for out, lse, max|logit| and dq/dk/dv.
bfloat16 inputs: the kernel rounds P and dS to bf16 before its matmuls (as
FlashAttention does) and returns bf16, so it is held to the float32 reference
on the same bf16 inputs within 2e-2 * max(1, max|ref|). Measured for the bf16
case below (max|ref| 2.6-4.2): out 5.8e-3, dq 8.1e-3, dk and dv 1.6e-2, i.e.
about one bf16 ulp at |x| ~ 3, well inside the bound.
"""


import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, windowed_flash_attention
from pallas_kernels.windowed_flash import (
    kv_block_range, q_block_range, visited_kv_blocks)

F32_TOL = 2e-5
BF16_TOL = 2e-2


def _inputs(seed, b, t, h, kvh, d, dtype=jnp.float32):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, t, h, d), jnp.float32)
  k = jax.random.normal(kk, (b, t, kvh, d), jnp.float32)
  v = jax.random.normal(kv, (b, t, kvh, d), jnp.float32)
  do = jax.random.normal(kd, (b, t, h, d), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v)) + (do,)


def _max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# --------------------------------------------------------------------------
# Block skipping.


def _visible_blocks_brute(rows, cols, block_rows, block_cols, n_blocks, window,
                          row_is_query):
  """Blocks along `cols` that hold at least one visible (query, key) pair."""
  out = set()
  for blk in range(n_blocks):
    for r in rows:
      for c in range(blk * block_cols, (blk + 1) * block_cols):
        i, j = (r, c) if row_is_query else (c, r)
        if j <= i and (window is None or j > i - window):
          out.add(blk)
          break
      if blk in out:
        break
  return out


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 32), (32, 16)])
def test_block_ranges_are_exact(block_q, block_k):
  tp = 128
  nq, nk = tp // block_q, tp // block_k
  for window in (None, 1, 5, 16, 17, 40, 128, 500):
    for qi in range(nq):
      lo, hi = kv_block_range(qi, block_q=block_q, block_k=block_k,
                              window=window, num_kv_blocks=nk)
      rows = range(qi * block_q, (qi + 1) * block_q)
      want = _visible_blocks_brute(rows, None, block_q, block_k, nk, window,
                                   row_is_query=True)
      assert set(range(lo, hi)) == want, (window, qi)
      if window is not None:
        # ~ (window + block_q) / block_k blocks, not T / block_k.
        assert hi - lo <= -(-(window - 1 + block_q) // block_k) + 1
    for kj in range(nk):
      lo, hi = q_block_range(kj, block_q=block_q, block_k=block_k,
                             window=window, num_q_blocks=nq)
      keys = range(kj * block_k, (kj + 1) * block_k)
      want = _visible_blocks_brute(keys, None, block_k, block_q, nq, window,
                                   row_is_query=False)
      assert set(range(lo, hi)) == want, (window, kj)


def test_kernel_visits_only_window_blocks():
  # T=512 in 16 key blocks; window 32 with 32-row query blocks touches 2.
  q, k, v, _ = _inputs(0, 1, 512, 2, 1, 16)
  counts = np.asarray(visited_kv_blocks(q, k, v, window=32, block_q=32,
                                        block_k=32))
  assert counts.shape == (1, 2, 16)
  want = [1] + [2] * 15
  np.testing.assert_array_equal(counts, np.broadcast_to(want, counts.shape))
  causal = np.asarray(visited_kv_blocks(q, k, v, window=None, block_q=32,
                                        block_k=32))
  np.testing.assert_array_equal(causal[0, 0], np.arange(1, 17))


# --------------------------------------------------------------------------
# Numerics against the dense reference.

CASES = [
    # b, t, h, kvh, d, window, cap, block_q, block_k
    (2, 200, 4, 2, 32, 17, None, 64, 32),   # T % block != 0, GQA 2, B>1
    (1, 96, 2, 2, 16, 1, None, 32, 32),     # window=1: out == v
    (1, 64, 4, 1, 24, 100, 30.0, 32, 32),   # window >= T, MQA, D not pow2
    (2, 128, 4, 4, 16, None, None, 32, 64),  # full causal, MHA
    (1, 150, 4, 1, 32, 40, 5.0, 32, 64),    # soft-cap on, bq < bk
]


def _outputs_and_grads(attn_fn, q, k, v, do):
  """(out, lse, max_abs, (dq, dk, dv)) of sum(out * do), in one jitted program
  (eager interpret mode dispatches op by op and is ~10x slower)."""

  @jax.jit
  def run(q, k, v, do):
    (out, lse, amax), vjp = jax.vjp(attn_fn, q, k, v)
    grads = vjp((do.astype(out.dtype), jnp.zeros_like(lse),
                 jnp.zeros_like(amax)))
    return out, lse, amax, grads

  return run(q, k, v, do)


@pytest.mark.parametrize("b,t,h,kvh,d,window,cap,block_q,block_k", CASES)
def test_forward_and_grads_match_reference_f32(b, t, h, kvh, d, window, cap,
                                               block_q, block_k):
  q, k, v, do = _inputs(1, b, t, h, kvh, d)
  kw = dict(window=window, logits_soft_cap=cap)
  out, lse, amax, grads = _outputs_and_grads(
      lambda q, k, v: windowed_flash_attention(
          q, k, v, block_q=block_q, block_k=block_k, block_q_bwd=block_k,
          block_k_bwd=block_q, return_stats=True, interpret=True, **kw),
      q, k, v, do)
  ref_out, ref_lse, ref_amax, ref_grads = _outputs_and_grads(
      lambda q, k, v: reference(q, k, v, **kw), q, k, v, do)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == amax.shape == (b, h, t)
  assert _max_err(out, ref_out) <= F32_TOL
  assert _max_err(lse, ref_lse) <= F32_TOL
  assert _max_err(amax, ref_amax) <= F32_TOL
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert g.shape == rg.shape
    assert _max_err(g, rg) <= F32_TOL, name

  if window == 1:  # each query sees only itself
    np.testing.assert_allclose(out, jnp.repeat(v, h // kvh, axis=2),
                               atol=F32_TOL)
  if window is not None and window >= t:  # equals full causal attention
    causal_out = reference(q, k, v, window=None, logits_soft_cap=cap)[0]
    assert _max_err(out, causal_out) <= F32_TOL


def test_stats_have_no_gradient():
  q, k, v, _ = _inputs(2, 1, 64, 2, 1, 16)
  g = jax.jit(jax.grad(lambda q: jnp.sum(windowed_flash_attention(
      q, k, v, window=8, block_q=32, block_k=32, return_stats=True,
      interpret=True)[1])))(q)
  assert float(jnp.max(jnp.abs(g))) == 0.0


def test_bf16_matches_reference_within_tolerance():
  b, t, h, kvh, d = 1, 160, 4, 2, 32
  q, k, v, do = _inputs(3, b, t, h, kvh, d, jnp.bfloat16)
  kw = dict(window=48, logits_soft_cap=None)
  out, lse, _, grads = _outputs_and_grads(
      lambda q, k, v: windowed_flash_attention(
          q, k, v, block_q=32, block_k=64, return_stats=True, interpret=True,
          **kw), q, k, v, do)
  ref_out, ref_lse, _, ref_grads = _outputs_and_grads(
      lambda q, k, v: reference(q, k, v, **kw), q, k, v, do)
  assert out.dtype == jnp.bfloat16
  for name, x, rx in [("out", out, ref_out), ("lse", lse, ref_lse),
                      *zip(("dq", "dk", "dv"), grads, ref_grads)]:
    assert x.shape == rx.shape
    scale = max(1.0, float(jnp.max(jnp.abs(rx))))
    assert _max_err(x, rx) <= BF16_TOL * scale, name


# --------------------------------------------------------------------------
# Argument validation.


@pytest.mark.parametrize("kwargs,shapes,match", [
    (dict(window=0), None, "window"),
    (dict(window=8, block_q=48), None, "block_q"),
    (dict(window=8, block_k=8), None, "block_k"),
    (dict(window=8, logits_soft_cap=-1.0), None, "logits_soft_cap"),
    (dict(window=8), ((1, 32, 3, 16), (1, 32, 2, 16)), "multiple"),
    (dict(window=8), ((1, 32, 2, 16), (1, 32, 2, 8)), "head dims"),
])
def test_bad_arguments_raise(kwargs, shapes, match):
  q_shape, kv_shape = shapes or ((1, 32, 2, 16), (1, 32, 1, 16))
  q = jnp.ones(q_shape)
  k = v = jnp.ones(kv_shape)
  with pytest.raises(ValueError, match=match):
    windowed_flash_attention(q, k, v, interpret=True, **kwargs)


# --------------------------------------------------------------------------
# GPU lowering without a GPU: jax can lower for the "cuda" platform on a CPU
# host, which runs the Pallas -> Triton IR lowering (types, tile shapes, ops)
# and stops before PTX compilation. Catches kernels that only interpret.


@pytest.mark.parametrize("dtype,window,cap,kvh,d", [
    (jnp.bfloat16, 17, 5.0, 2, 32),
    (jnp.float32, None, None, 1, 24),
])
def test_lowers_to_triton_for_cuda(dtype, window, cap, kvh, d):
  q = jnp.ones((2, 200, 4, d), dtype)
  k = v = jnp.ones((2, 200, kvh, d), dtype)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: windowed_flash_attention(
        q, k, v, window=window, logits_soft_cap=cap, block_q=64,
        block_k=32), q, k, v)
    return out, vjp(out)

  hlo = jax.jit(fwd_bwd).trace(q, k, v).lower(
      lowering_platforms=("cuda",)).as_text()
  # forward, dq and dk/dv kernels
  assert hlo.count("__gpu$xla.gpu.triton") == 3


# --------------------------------------------------------------------------
# LS-attention in one launch: per-head window (heads < num_local_heads are
# local, the rest causal) and left padding (start_B) inside the kernel.

PAD_CASES = [
    # b, t, h, kvh, d, window, num_local, start_B, bq, bk, bq_bwd, bk_bwd
    (2, 100, 4, 2, 16, 9, 3, (0, 37), 32, 16, 16, 32),   # GQA group cut 3|1
    (2, 72, 4, 1, 16, 1, 4, (5, 50), 32, 32, 16, 16),    # MQA, window 1, all local
    (2, 60, 2, 2, 16, 200, 1, (17, 0), 16, 32, 32, 16),  # window >= T
    (1, 50, 4, 2, 24, 6, 0, (13,), 32, 16, 16, 16),      # 0 local (causal), D=24
    (2, 40, 2, 1, 16, 5, 1, (40, 3), 16, 16, 16, 16),    # a row fully padded
]


def _valid_rows(start_B, t):
  """[B, 1, T]: rows that see at least one key."""
  return (np.arange(t)[None, :] >= np.asarray(start_B)[:, None])[:, None, :]


@pytest.mark.parametrize("case", PAD_CASES)
def test_left_padding_and_local_heads_match_reference(case):
  b, t, h, kvh, d, window, nl, start, bq, bk, bqb, bkb = case
  start_B = jnp.array(start, jnp.int32)
  q, k, v, do = _inputs(4, b, t, h, kvh, d)
  kw = dict(window=window, num_local_heads=nl)
  out, lse, amax, grads = _outputs_and_grads(
      lambda q, k, v: windowed_flash_attention(
          q, k, v, start_B, block_q=bq, block_k=bk, block_q_bwd=bqb,
          block_k_bwd=bkb, return_stats=True, interpret=True, **kw),
      q, k, v, do)
  ref_out, ref_lse, ref_amax, ref_grads = _outputs_and_grads(
      lambda q, k, v: reference(q, k, v, start_B, **kw), q, k, v, do)
  valid = _valid_rows(start, t)
  assert _max_err(out, ref_out) <= F32_TOL
  assert _max_err(jnp.where(valid, lse, 0.0), jnp.where(valid, ref_lse, 0.0)) \
      <= F32_TOL
  assert bool(jnp.all(jnp.isfinite(lse)))  # padding rows: a safe finite lse
  assert _max_err(amax, ref_amax) <= F32_TOL
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert _max_err(g, rg) <= F32_TOL, name
  # Rows before start_B see no key: output exactly 0, and no gradient flows
  # to the padding keys.
  for bi, s in enumerate(start):
    for x in (out, grads[1], grads[2]):
      assert float(jnp.max(jnp.abs(x[bi, :s]), initial=0.0)) == 0.0


def test_padding_skips_key_blocks_before_start():
  # 16 key blocks of 32; row b=1 starts at 200: its query blocks begin their
  # loop at block 200 // 32 = 6 and blocks wholly before 200 visit nothing.
  q, k, v, _ = _inputs(5, 2, 512, 2, 1, 16)
  start_B = jnp.array([0, 200])
  counts = np.asarray(visited_kv_blocks(q, k, v, start_B, window=None,
                                        block_q=32, block_k=32))
  np.testing.assert_array_equal(counts[0, 0], np.arange(1, 17))
  want = np.maximum(np.arange(1, 17) - 6, 0)  # blocks [6, qi] for qi >= 6
  np.testing.assert_array_equal(counts[1, 0], want)
  # Mixed heads in one launch: head 0 local (window 32: 2 blocks), head 1
  # causal.
  mixed = np.asarray(visited_kv_blocks(q, k, v, window=32, num_local_heads=1,
                                       block_q=32, block_k=32))
  np.testing.assert_array_equal(mixed[0, 0], [1] + [2] * 15)
  np.testing.assert_array_equal(mixed[0, 1], np.arange(1, 17))


def test_stats_are_optional_outputs():
  q, k, v, _ = _inputs(6, 1, 64, 2, 1, 16)
  out = windowed_flash_attention(q, k, v, window=8, block_q=32, block_k=32,
                                 interpret=True)
  assert isinstance(out, jax.Array) and out.shape == q.shape
  out2, lse, amax = windowed_flash_attention(
      q, k, v, window=8, block_q=32, block_k=32, return_stats=True,
      interpret=True)
  np.testing.assert_array_equal(out, out2)
  assert lse.shape == amax.shape == (1, 2, 64)


def _triton_calls(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]


def test_cuda_lowering_one_launch_per_kernel_with_separate_bwd_tiles():
  # 8 heads (6 local), GQA 2, left padding, stats: still exactly one forward,
  # one dq and one dk/dv launch, with grids from the fwd and bwd tiles, and no
  # XLA dot_general (delta is a multiply-reduce).
  b, t, h, kvh, d = 2, 1024, 8, 4, 64
  q = jnp.ones((b, t, h, d), jnp.bfloat16)
  k = jnp.ones((b, t, kvh, d), jnp.bfloat16)
  start_B = jnp.array([0, 100])

  def fwd_bwd(q, k, v):
    def f(q, k, v):
      return windowed_flash_attention(q, k, v, start_B, window=128,
                                      num_local_heads=6, return_stats=True)
    (out, lse, amax), vjp = jax.vjp(f, q, k, v)
    return out, lse, amax, vjp((out, jnp.zeros_like(lse), jnp.zeros_like(amax)))

  hlo = jax.jit(fwd_bwd).trace(q, k, k).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = _triton_calls(hlo)
  assert len(calls) == 3
  grids = [tuple(int(x) for x in re.search(
      r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", c).groups())
           for c in calls]
  # fwd (T/128, B, H); dq (T/64, B, H); dk/dv (T/64, B, H): over QUERY heads.
  assert sorted(grids) == sorted([(8, b, h), (16, b, h), (16, b, h)])
  assert hlo.count("stablehlo.dot_general") == 0
