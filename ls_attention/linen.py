"""`ls_attention.linen.LSAttention`: a Flax Linen module over the same functional core.

For Flax projects still on Linen. Parameters mirror the NNX layer (and Hugging Face):
`q_proj/k_proj/v_proj/o_proj` with `kernel` [in, out] (+ `bias`), and `q_norm/k_norm` with
`weight`, so an NNX state converts by renaming nothing. The cache follows the same functional
protocol as the NNX layer (`init_cache` + `cache=`/`index=` arguments, new cache returned)
instead of Linen's mutable "cache" collection, so both shells share `ls_attention.cache`.
Stats go to the "intermediates" collection under "attn_stats" when `collect_stats=True`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.config import ModelConfig
from common.layers import apply_rope, dtype_of, rms_norm, rope_inv_freq
from ls_attention.block_sizes import BlockSizes
from ls_attention.cache import LSCache, attend, init_ls_cache
from ls_attention.module import effective_window
from ls_attention.ops import resolve_implementation


class RMSNorm(nn.Module):
  eps: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return rms_norm(x, weight, self.eps)


class LSAttention(nn.Module):
  """LS-attention layer (heads [0, num_local_heads) local with `window`, the rest global)."""
  num_heads: int
  num_local_heads: int
  window: int
  head_dim: int
  num_kv_heads: int | None = None
  d_model: int | None = None          # output width; defaults to the input width
  position_embedding: str = "rope"    # "rope" or "none" (learned positions live in the model)
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  qk_norm: bool = False
  rms_norm_eps: float = 1e-5
  logits_soft_cap: float | None = None
  qkv_bias: bool = False
  implementation: str = "auto"
  # Kernel tiles: a BlockSizes or a dict of its fields (e.g. ModelConfig.attn_block_sizes).
  block_sizes: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: ModelConfig, **kw) -> "LSAttention":
    return cls(num_heads=config.num_heads, num_local_heads=config.num_local_heads,
               window=config.window, head_dim=config.head_dim,
               num_kv_heads=config.num_kv_heads, d_model=config.d_model,
               position_embedding="rope" if config.position_embedding == "rope" else "none",
               rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
               qk_norm=config.qk_norm, rms_norm_eps=config.rms_norm_eps,
               logits_soft_cap=config.attn_logits_soft_cap, qkv_bias=config.qkv_bias,
               implementation=config.attention_impl, block_sizes=config.attn_block_sizes,
               dtype=dtype_of(config.dtype),
               param_dtype=dtype_of(config.param_dtype), **kw)

  @property
  def _kvh(self) -> int:
    return self.num_kv_heads or self.num_heads

  def _check(self):
    if not 0 <= self.num_local_heads <= self.num_heads:
      raise ValueError(f"num_local_heads must be in [0, {self.num_heads}], "
                       f"got {self.num_local_heads}")
    if self.num_local_heads and self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.num_heads % self._kvh:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self._kvh})")
    if self.position_embedding not in ("rope", "none"):
      raise ValueError(f"position_embedding must be 'rope' or 'none', "
                       f"got {self.position_embedding!r}")
    resolve_implementation(self.implementation)
    BlockSizes.from_any(self.block_sizes)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> LSCache:
    """Works on an unbound module: `LSAttention(...).init_cache(B, max_len)`."""
    self._check()
    return init_ls_cache(batch_size, max_len, num_heads=self.num_heads,
                         num_kv_heads=self._kvh, head_dim=self.head_dim,
                         num_local_heads=self.num_local_heads,
                         window=effective_window(self.num_local_heads, self.window),
                         dtype=dtype or self.dtype)

  @nn.compact
  def __call__(self, x_BxTxD, *, positions_BxT=None, start_B=None, cache: LSCache | None = None,
               index=0, collect_stats: bool = False):
    self._check()
    b, t, d_in = x_BxTxD.shape
    h, kvh, hd = self.num_heads, self._kvh, self.head_dim
    init = nn.initializers.truncated_normal(0.02)  # same as common.layers.Linear(init_std=.02)
    dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, kernel_init=init, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name=name)
    x = x_BxTxD.astype(self.dtype)
    q = dense(h * hd, self.qkv_bias, "q_proj")(x).reshape(b, t, h, hd)
    k = dense(kvh * hd, self.qkv_bias, "k_proj")(x).reshape(b, t, kvh, hd)
    v = dense(kvh * hd, self.qkv_bias, "v_proj")(x).reshape(b, t, kvh, hd)
    if self.qk_norm:
      q = RMSNorm(self.rms_norm_eps, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(self.rms_norm_eps, self.param_dtype, name="k_norm")(k)
    if self.position_embedding == "rope":
      if positions_BxT is None:
        s0 = jnp.zeros((b, 1), jnp.int32) if start_B is None else jnp.asarray(start_B)[:, None]
        positions_BxT = jnp.maximum(index + jnp.arange(t)[None, :] - s0, 0)
      inv_freq = rope_inv_freq(hd, self.rope_theta, self.rope_scaling)
      q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
    out, stats, new_cache = attend(
        q, k, v, cache=cache, index=index, start_B=start_B,
        block_sizes=BlockSizes.from_any(self.block_sizes), collect_stats=collect_stats,
        num_local_heads=self.num_local_heads,
        window=effective_window(self.num_local_heads, self.window),
        logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    if collect_stats:
      self.sow("intermediates", "attn_stats", stats)
    y = dense(self.d_model or d_in, False, "o_proj")(out.reshape(b, t, h * hd))
    return y, new_cache
