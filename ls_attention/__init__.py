"""LS-attention (Long Short-attention, arXiv 2505.15548): functional op, decode cache, modules.

  ls_attention(q, k, v, *, num_local_heads, window, implementation="auto", ...)  the op
  make_attention_fn(num_local_heads=..., window=...)   Flax `attention_fn` for nnx/linen MHA
  BlockSizes                                           kernel tiles (GPU fwd/bwd, TPU per group)
  ls_attention_reference(...)                          dense float32 definition (tests)
  init_ls_cache / ls_cache_attend / kv_memory_ratio    ring-buffer decode cache
  LSAttention                                          Flax NNX layer (common decoder plug)
  linen.LSAttention                                    Flax Linen layer, same core

`import ls_attention` registers the NNX layer as `ModelConfig(attention="ls")` in the common
decoder's attention registry (common/attention.py).
"""

from common.attention import register_attention
from ls_attention import linen
from ls_attention.attention_fn import make_attention_fn
from ls_attention.block_sizes import BlockSizes
from ls_attention.cache import LSCache, init_ls_cache, kv_memory_ratio, ls_cache_attend
from ls_attention.module import LSAttention, layer_config
from ls_attention.ops import IMPLEMENTATIONS, ls_attention
from ls_attention.reference import ls_attention_reference

register_attention("ls", LSAttention)

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "LSAttention", "LSCache", "init_ls_cache",
           "kv_memory_ratio", "layer_config", "linen", "ls_attention", "ls_attention_reference",
           "ls_cache_attend", "make_attention_fn"]
