"""The Pallas paths of ls_attention (GPU windowed flash kernel, TPU splash) in interpret mode.

Left padding (start_B) and the statistics are handled inside the kernels; the lowering tests
(test_kernel_lowering.py) check that no XLA fallback or score pass is left for them.

The kernels live in pallas_kernels/ (another package); these tests check the LS-attention
dispatch around them against the dense reference. A test skips only when the kernel function
does not exist; a kernel that exists but fails makes the test fail.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import pytest

from ls_attention import ls_attention
from tests.ls_attention.helpers import assert_close, out_and_grads, qkv

F32_TOL = 2e-5
BF16_TOL = 3e-2  # see test_ops.BF16_TOL


def _require(module, name):
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name == module:
      pytest.skip(f"{module} does not exist yet")
    raise
  if not hasattr(mod, name):
    pytest.skip(f"{module}.{name} is not provided yet")


def _op(impl, nl, w, **kw):
  return jax.jit(functools.partial(ls_attention, num_local_heads=nl, window=w,
                                   implementation=impl, interpret=True, **kw))


# (b, t, h, kvh, d, window, num_local_heads, soft_cap): T not a multiple of the block, window=1,
# window >= T, num_local_heads in {0, 1, H-1, H}, KVH in {1, 2, H}, GQA group cut by the
# local/global boundary (3 of 4 with G=2).
PALLAS_CASES = [
    (2, 40, 4, 2, 16, 5, 3, None),
    (1, 33, 4, 1, 16, 1, 4, 4.0),
    (1, 24, 2, 2, 16, 64, 1, None),
    (1, 20, 4, 4, 16, 3, 0, None),
    (1, 150, 2, 1, 16, 20, 1, None),  # several 128-blocks, T not a multiple of the block
]


@pytest.mark.parametrize("case", PALLAS_CASES)
def test_pallas_interpret_matches_reference(case):
  _require("pallas_kernels.windowed_flash", "windowed_flash_attention")
  b, t, h, kvh, d, w, nl, cap = case
  q, k, v = qkv(sum(case[:7]), b, t, h, kvh, d)
  out_p, g_p = out_and_grads(_op("pallas", nl, w, logits_soft_cap=cap), q, k, v)
  out_r, g_r = out_and_grads(_op("reference", nl, w, logits_soft_cap=cap), q, k, v)
  assert_close(out_p, out_r, F32_TOL, "out")
  for name, gp, gr in zip("qkv", g_p, g_r):
    assert_close(gp, gr, F32_TOL, f"d{name}")


def test_pallas_stats_padding_and_bf16():
  _require("pallas_kernels.windowed_flash", "windowed_flash_attention")
  q, k, v = qkv(21, 2, 36, 4, 2, 16)
  _, sp = _op("pallas", 2, 6, return_stats=True)(q * 2, k, v)
  _, sr = _op("reference", 2, 6, return_stats=True)(q * 2, k, v)
  for key in sr:
    assert_close(sp[key], sr[key], 1e-4, key)
  # left padding: masked inside the kernel
  start_B = jnp.array([0, 7])
  assert_close(_op("pallas", 2, 6, start_B=start_B)(q, k, v),
               _op("reference", 2, 6, start_B=start_B)(q, k, v), F32_TOL, "padded")
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = _op("pallas", 2, 6)(qb, kb, vb)
  assert out.dtype == jnp.bfloat16
  assert_close(out, _op("reference", 2, 6)(q, k, v), BF16_TOL, "bf16")


def test_splash_interpret_matches_reference():
  _require("pallas_kernels.splash", "ls_attention_splash")
  q, k, v = qkv(31, 1, 40, 4, 2, 16)
  out_s, g_s = out_and_grads(_op("splash", 3, 6), q, k, v)
  out_r, g_r = out_and_grads(_op("reference", 3, 6), q, k, v)
  assert_close(out_s, out_r, F32_TOL, "out")
  for name, gs, gr in zip("qkv", g_s, g_r):
    assert_close(gs, gr, F32_TOL, f"d{name}")
  _, ss = _op("splash", 3, 6, return_stats=True)(q, k, v)
  _, sr = _op("reference", 3, 6, return_stats=True)(q, k, v)
  for key in sr:
    assert_close(ss[key], sr[key], 1e-4, key)


# Left padding and statistics in the kernels themselves (no XLA fallback): out, dq/dk/dv and
# the four stats of the trainers' calls against the dense reference.
PAD_CASES = [
    # impl, (b, t, h, kvh, d, window, num_local_heads), start_B
    ("pallas", (2, 40, 4, 2, 16, 5, 3), (0, 11)),
    ("pallas", (2, 33, 4, 1, 16, 1, 4), (7, 33)),   # MQA, all local, a fully padded row
    ("pallas", (1, 30, 2, 2, 16, 64, 0), (4,)),      # all global, window >= T
    ("splash", (2, 40, 4, 2, 16, 6, 3), (0, 9)),
    ("splash", (2, 40, 2, 1, 16, 6, 2), (3, 0)),     # MQA, all local
]


@pytest.mark.parametrize("impl,case,start", PAD_CASES)
def test_kernels_mask_left_padding_and_return_stats(impl, case, start):
  _require("pallas_kernels.windowed_flash" if impl == "pallas" else "pallas_kernels.splash",
           "windowed_flash_attention" if impl == "pallas" else "ls_attention_splash")
  b, t, h, kvh, d, w, nl = case
  q, k, v = qkv(sum(case), b, t, h, kvh, d)
  q = q * 2.0  # larger logits: max |logit| differs clearly between heads
  start_B = jnp.array(start, jnp.int32)
  out_k, g_k = out_and_grads(_op(impl, nl, w, start_B=start_B), q, k, v)
  out_r, g_r = out_and_grads(_op("reference", nl, w, start_B=start_B), q, k, v)
  assert_close(out_k, out_r, F32_TOL, "out")
  for name, gk, gr in zip("qkv", g_k, g_r):
    assert_close(gk, gr, F32_TOL, f"d{name}")
  for bi, s in enumerate(start):
    assert float(jnp.max(jnp.abs(out_k[bi, :s]), initial=0.0)) == 0.0
  _, sk = _op(impl, nl, w, start_B=start_B, return_stats=True)(q, k, v)
  _, sr = _op("reference", nl, w, start_B=start_B, return_stats=True)(q, k, v)
  assert set(sk) == set(sr)
  for key in sr:
    assert_close(sk[key], sr[key], 1e-4, key)
