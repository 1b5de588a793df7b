"""Pallas kernels serving ls_attention.

- `windowed_flash_attention`: causal sliding-window flash attention (GPU/Triton
  lowering, or `interpret=True` on CPU), forward + backward with block skipping.
- `ls_attention_splash`: LS-attention through jax's TPU splash attention.
- `reference`: the dense float32 definition both are tested against.
"""

from pallas_kernels.reference import reference, window_mask
from pallas_kernels.splash import ls_attention_splash
from pallas_kernels.windowed_flash import (
    kv_block_range,
    q_block_range,
    windowed_flash_attention,
)

__all__ = [
    "kv_block_range",
    "ls_attention_splash",
    "q_block_range",
    "reference",
    "window_mask",
    "windowed_flash_attention",
]
