"""LS-attention (Long Short-attention, arXiv 2505.15548): functional op, decode cache, modules.

`import ls_attention` registers the NNX layer as `ModelConfig(attention="ls")` in the common
decoder's attention registry.
"""

from ls_attention.ops import IMPLEMENTATIONS, ls_attention
from ls_attention.reference import ls_attention_reference

__all__ = ["IMPLEMENTATIONS", "ls_attention", "ls_attention_reference"]
