"""`LSAttention`: the Flax NNX shell over the functional LS-attention core.

It plugs into the common decoder (`ModelConfig(attention="ls", num_local_heads=...,
window=...)`) through the protocol in common/attention.py, and reuses `MultiHeadAttention`'s
projections, QK-norm and RoPE so that parameter names (q_proj/k_proj/v_proj/o_proj,
q_norm/k_norm) and checkpoints are interchangeable with the MHSA layer. Only the attention
core (`ls_attention.ls_attention`) and the cache (`ls_attention.cache`) differ.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from common.attention import MultiHeadAttention
from common.config import ModelConfig
from common.layers import dtype_of
from ls_attention.block_sizes import BlockSizes
from ls_attention.cache import LSCache, attend, init_ls_cache
from ls_attention.ops import resolve_implementation


def effective_window(num_local_heads: int, window: int) -> int:
  """ModelConfig allows window=0 when there are no local heads; the op needs window >= 1."""
  return window if num_local_heads else max(window, 1)


def layer_config(*, d_model: int, num_heads: int, num_local_heads: int, window: int,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 position_embedding: str = "rope", qk_norm: bool = False,
                 logits_soft_cap: float | None = None, implementation: str = "auto",
                 block_sizes: dict | None = None, **overrides) -> ModelConfig:
  """A ModelConfig for using LSAttention on its own (model-only fields get dummy values)."""
  base = dict(vocab_size=1, num_layers=1, mlp_dim=1, d_model=d_model, num_heads=num_heads,
              num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim or d_model // num_heads,
              attention="ls", num_local_heads=num_local_heads, window=window,
              position_embedding=position_embedding, qk_norm=qk_norm,
              attn_logits_soft_cap=logits_soft_cap, attention_impl=implementation,
              attn_block_sizes=block_sizes)
  base.update(overrides)
  return ModelConfig(**base)


class LSAttention(MultiHeadAttention):
  """LS-attention layer: heads [0, num_local_heads) see a causal window, the rest all keys.

  Build it from a ModelConfig (as the decoder does) or from keywords, like the Linen layer:
  `LSAttention(d_model=256, num_heads=8, num_local_heads=6, window=128, rngs=nnx.Rngs(0))`
  (the keywords of `layer_config`).

  Call: `layer(x_BxTxD, positions_BxT=..., start_B=None, cache=None, index=0,
  collect_stats=False) -> (y_BxTxD, new_cache)`; see common/attention.py for slots.
  """

  def __init__(self, config: ModelConfig | None = None, *, rngs: nnx.Rngs, **layer_kwargs):
    if config is None:
      config = layer_config(**layer_kwargs)
    elif layer_kwargs:
      raise TypeError(f"LSAttention: pass a ModelConfig or keywords, not both (got config and "
                      f"{sorted(layer_kwargs)})")
    if not 0 <= config.num_local_heads <= config.num_heads:
      raise ValueError(f"num_local_heads must be in [0, {config.num_heads}], "
                       f"got {config.num_local_heads}")
    if config.num_local_heads and config.window < 1:
      raise ValueError(f"window must be >= 1, got {config.window}")
    resolve_implementation(config.attention_impl)  # validates the name early
    # Validated once here (ModelConfig keeps a plain dict so configs stay JSON).
    block_sizes = BlockSizes.from_any(config.attn_block_sizes)
    super().__init__(config, rngs=rngs)
    self.block_sizes = block_sizes
    self.num_local_heads = config.num_local_heads
    self.window = effective_window(config.num_local_heads, config.window)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> LSCache:
    c = self.config
    return init_ls_cache(batch_size, max_len, num_heads=c.num_heads,
                         num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                         num_local_heads=self.num_local_heads, window=self.window,
                         dtype=dtype or dtype_of(c.dtype))

  def __call__(self, x_BxTxD, *, positions_BxT=None, start_B=None, cache: LSCache | None = None,
               index=0, collect_stats: bool = False):
    c = self.config
    b, t, _ = x_BxTxD.shape
    if positions_BxT is None:  # the decoder's convention: position = slot - start
      s0 = jnp.zeros((b, 1), jnp.int32) if start_B is None else jnp.asarray(start_B)[:, None]
      positions_BxT = jnp.maximum(index + jnp.arange(t)[None, :] - s0, 0)
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
    out, stats, new_cache = attend(
        q, k, v, cache=cache, index=index, start_B=start_B, block_sizes=self.block_sizes,
        collect_stats=collect_stats, num_local_heads=self.num_local_heads, window=self.window,
        logits_soft_cap=c.attn_logits_soft_cap, implementation=c.attention_impl)
    if collect_stats:
      self.sow(nnx.Intermediate, "attn_stats", stats)
    return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), new_cache
