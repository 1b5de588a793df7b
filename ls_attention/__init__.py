"""LS-attention (Long Short-attention, arXiv 2505.15548): functional op, decode cache, modules.

`import ls_attention` registers the NNX layer as `ModelConfig(attention="ls")` in the common
decoder's attention registry.
"""

from ls_attention.ops import IMPLEMENTATIONS, ls_attention
from ls_attention.reference import ls_attention_reference

__all__ = ["IMPLEMENTATIONS", "ls_attention", "ls_attention_reference"]

from common.attention import register_attention
from ls_attention.cache import LSCache, init_ls_cache, kv_memory_ratio, ls_cache_attend
from ls_attention.module import LSAttention, layer_config

register_attention("ls", LSAttention)

from ls_attention import linen  # noqa: E402  (ls_attention.linen.LSAttention)

__all__ += ["LSAttention", "LSCache", "init_ls_cache", "kv_memory_ratio", "layer_config",
            "ls_cache_attend"]
