"""BlockSizes: defaults, dict input, one-line errors naming the field."""

import pytest

from ls_attention import BlockSizes


def test_defaults_have_separate_64x64_backward_tiles():
  bs = BlockSizes()
  assert bs.gpu_kwargs() == dict(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=64)
  assert bs.tpu_kwargs() == dict(tpu_local_block_q=None, tpu_local_block_kv=None,
                                 tpu_global_block=None)


def test_from_any():
  assert BlockSizes.from_any(None) == BlockSizes()
  bs = BlockSizes(block_q=64)
  assert BlockSizes.from_any(bs) is bs
  assert BlockSizes.from_any({"block_k_bwd": 32, "tpu_global_block": 1024}) == BlockSizes(
      block_k_bwd=32, tpu_global_block=1024)


@pytest.mark.parametrize("value,match", [
    ({"block_q": 48}, r"BlockSizes.block_q must be a power of two >= 16; got 48"),
    ({"block_k_bwd": 8}, r"BlockSizes.block_k_bwd must be a power of two"),
    ({"block_q": True}, r"BlockSizes.block_q must be"),
    ({"tpu_local_block_kv": 200}, r"BlockSizes.tpu_local_block_kv must be None or a multiple"),
    ({"blockq": 64}, r"unknown field\(s\) \['blockq'\]; allowed"),
    ((64, 64), r"block_sizes must be a BlockSizes, a dict or None; got tuple"),
])
def test_bad_values_raise_one_line(value, match):
  with pytest.raises(ValueError, match=match) as e:
    BlockSizes.from_any(value)
  assert "\n" not in str(e.value)
