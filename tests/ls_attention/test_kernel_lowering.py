"""The trainers' LS-attention calls lower to the kernels alone, for GPU and TPU, on this CPU.

`jax.jit(f).trace(*args).lower(lowering_platforms=(...))` runs the Pallas -> Triton ("cuda")
and Pallas -> Mosaic ("tpu") lowerings without a device. The two trainers call the op as:
  * LM training (common/train/lm_step.py): `collect_stats=True` -> `return_stats=True`;
  * GRPO scoring (soft_grpo/trainer.py): left-padded prompts -> `start_B` given.
Their forward + backward must lower with no more XLA `dot_general`s than the plain call (no
XLA fallback for padding, no XLA score pass for the stats), with no `lax.cond`, and with the
expected number of kernel launches. Shapes are the issue's (B=2, T=1024, H=8, KVH=4, 6 local,
w=128); nothing is executed, so the size costs only lowering time.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import ls_attention
from ls_attention import BlockSizes

B, T, H, KVH, D, NL, W = 2, 1024, 8, 4, 64, 6, 128
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
IMPL = {"cuda": "pallas", "tpu": "splash"}


def _lower(platform, *, padded, stats, block_sizes=None):
  q = jnp.ones((B, T, H, D), jnp.bfloat16)
  k = jnp.ones((B, T, KVH, D), jnp.bfloat16)
  start_B = jnp.array([0, 100], jnp.int32)

  def loss(q, k, v, start_B):
    res = ls_attention.ls_attention(
        q, k, v, num_local_heads=NL, window=W, implementation=IMPL[platform],
        return_stats=stats, start_B=start_B if padded else None, block_sizes=block_sizes)
    out, st = res if stats else (res, {})
    return jnp.sum(out.astype(jnp.float32) ** 2), st

  step = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(step).trace(q, k, k, start_B).lower(lowering_platforms=(platform,)).as_text()


def _count(hlo, what):
  return hlo.count(what)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_trainer_calls_add_no_xla_dots(platform):
  plain = _lower(platform, padded=False, stats=False)
  calls = {"grpo (start_B)": _lower(platform, padded=True, stats=False),
           "lm (return_stats)": _lower(platform, padded=False, stats=True),
           "both": _lower(platform, padded=True, stats=True)}
  n_plain = _count(plain, "stablehlo.dot_general")
  n_kernels = _count(plain, KERNEL_CALL[platform])
  assert n_kernels > 0
  for name, hlo in calls.items():
    assert _count(hlo, "stablehlo.dot_general") <= n_plain, name
    assert "stablehlo.case" not in hlo, f"{name}: a lax.cond (XLA fallback) is back"
    with_stats = name != "grpo (start_B)"
    extra = 2 if platform == "tpu" and with_stats else 0  # TPU max |logit| kernel per group
    assert _count(hlo, KERNEL_CALL[platform]) == n_kernels + extra, name
  if platform == "cuda":
    # one launch each for fwd, dq, dk/dv over all heads; no q slicing or concatenation
    assert n_kernels == 3
    for hlo in (plain, *calls.values()):
      assert "stablehlo.concatenate" not in hlo
      assert _count(hlo, "stablehlo.dot_general") == 0


def _grids(hlo):
  return sorted(tuple(int(x) for x in m.groups()) for m in re.finditer(
      r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", hlo))


def test_block_sizes_reach_the_gpu_kernels():
  # default: fwd 128 x 128, bwd 64 x 64 -> query-block grids T/128 (fwd), T/64 (dq, dk/dv)
  assert _grids(_lower("cuda", padded=True, stats=True)) == sorted(
      [(T // 128, B, H), (T // 64, B, H), (T // 64, B, H)])
  custom = dict(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=16)
  for bs in (BlockSizes(**custom), custom):
    assert _grids(_lower("cuda", padded=False, stats=False, block_sizes=bs)) == sorted(
        [(T // 64, B, H), (T // 32, B, H), (T // 16, B, H)])
