"""The pluggable attention sub-layer of the shared decoder.

Protocol every attention layer implements (the "plug"), so that `ModelConfig.attention`
selects it without touching the model:

  cls(config: ModelConfig, *, rngs: nnx.Rngs)
  layer.init_cache(batch_size: int, max_len: int, dtype) -> pytree     # per-layer KV cache
  layer(x_BxTxD, *, positions_BxT, start_B, cache, index, collect_stats=False)
      -> (y_BxTxD, new_cache)

Slot convention (shared with the sampler): the T new tokens occupy cache slots
[index, index + T). Row b's first valid slot is start_B[b] (prompts are left-padded), so a
query at slot i sees key slot j iff start_B[b] <= j <= i. With cache=None the layer attends
within x, i.e. index = 0 and slots [0, T). `positions_BxT` are the token positions used for
RoPE; they equal slot - start.

When `collect_stats` is true the layer sows, under nnx.Intermediate name "attn_stats", a dict
with the paper's instability diagnostic: `{local,global}_max_abs_logit` (max |pre-softmax
logit| over visible keys) and `{local,global}_mean_lse` (mean log-sum-exp). Plain MHSA has
only global heads and reports 0 for the local group.

Layers are registered by name; `import ls_attention` registers "ls".
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from common.config import ModelConfig
from common.layers import Linear, RMSNorm, apply_rope, dtype_of, rope_inv_freq

_MASK_VALUE = -1e30  # finite, so a fully masked (padding) query row gives no NaN.

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register_attention(name: str, cls) -> None:
  """Makes `ModelConfig(attention=name)` build `cls` as the attention sub-layer."""
  _REGISTRY[name] = cls


def get_attention_cls(name: str):
  if name not in _REGISTRY:
    hint = " (run `import ls_attention` first to register 'ls')" if name == "ls" else ""
    raise ValueError(f"ModelConfig.attention={name!r} is not registered; "
                     f"known: {sorted(_REGISTRY)}{hint}")
  return _REGISTRY[name]


@flax.struct.dataclass
class KVCache:
  k_BxSxKxD: jax.Array
  v_BxSxKxD: jax.Array


def causal_padding_mask(q_slots_T, k_slots_S, start_B):
  """[B, T, S] bool: key slot visible iff start_B <= k <= q."""
  causal_TxS = k_slots_S[None, :] <= q_slots_T[:, None]
  valid_BxS = k_slots_S[None, :] >= start_B[:, None]
  return causal_TxS[None] & valid_BxS[:, None, :]


def dense_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, *, logits_soft_cap=None,
                    return_stats=False):
  """Masked softmax attention with GQA; softmax in float32. The readable definition."""
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxSxKxD.shape[2]
  g = h // kvh
  q = q_BxTxHxD.reshape(b, t, kvh, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  mask = mask_BxTxS[:, None, None, :, :]
  masked = jnp.where(mask, logits, _MASK_VALUE)
  lse = jax.nn.logsumexp(masked, axis=-1)
  probs = jnp.exp(masked - lse[..., None])
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)
  if not return_stats:
    return out
  row_valid = jnp.any(mask_BxTxS, axis=-1)[:, None, None, :]  # [B,1,1,T]
  max_abs = jnp.max(jnp.where(mask, jnp.abs(logits), 0.0))
  mean_lse = jnp.sum(jnp.where(row_valid, lse, 0.0)) / jnp.maximum(
      jnp.sum(row_valid) * kvh * g, 1)
  return out, {"max_abs_logit": max_abs, "mean_lse": mean_lse}


class MultiHeadAttention(nnx.Module):
  """Causal multi-head attention with GQA, optional qkv bias, QK-norm and logit soft-cap."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = dtype_of(config.dtype), dtype_of(config.param_dtype)
    d, h, kvh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt, init_std=0.02)
    self.q_proj = Linear(d, h * hd, use_bias=config.qkv_bias, **kw)
    self.k_proj = Linear(d, kvh * hd, use_bias=config.qkv_bias, **kw)
    self.v_proj = Linear(d, kvh * hd, use_bias=config.qkv_bias, **kw)
    self.o_proj = Linear(h * hd, d, use_bias=False, **kw)
    if config.qk_norm:
      self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=pdt)
      self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=pdt)
    else:
      self.q_norm = self.k_norm = None

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    dtype = dtype or dtype_of(c.dtype)
    shape = (batch_size, max_len, c.num_kv_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def project_qkv(self, x_BxTxD, positions_BxT):
    """Projections, QK-norm and RoPE: shared by every attention variant."""
    c = self.config
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x_BxTxD).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x_BxTxD).reshape(b, t, c.num_kv_heads, c.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if c.position_embedding == "rope":
      inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
      q = apply_rope(q, positions_BxT, inv_freq)
      k = apply_rope(k, positions_BxT, inv_freq)
    return q, k, v

  def __call__(self, x_BxTxD, *, positions_BxT, start_B=None, cache: KVCache | None = None,
               index=0, collect_stats: bool = False):
    c = self.config
    b, t, _ = x_BxTxD.shape
    if start_B is None:
      start_B = jnp.zeros((b,), jnp.int32)
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
    q_slots = index + jnp.arange(t)
    if cache is None:
      keys, values, k_slots = k, v, jnp.arange(t)
      new_cache = None
    else:
      zero = jnp.zeros((), jnp.int32)
      idx = jnp.asarray(index, jnp.int32)
      keys = jax.lax.dynamic_update_slice(cache.k_BxSxKxD, k.astype(cache.k_BxSxKxD.dtype),
                                          (zero, idx, zero, zero))
      values = jax.lax.dynamic_update_slice(cache.v_BxSxKxD, v.astype(cache.v_BxSxKxD.dtype),
                                            (zero, idx, zero, zero))
      new_cache = KVCache(keys, values)
      k_slots = jnp.arange(keys.shape[1])
    mask = causal_padding_mask(q_slots, k_slots, start_B)
    res = dense_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask,
                          logits_soft_cap=c.attn_logits_soft_cap, return_stats=collect_stats)
    if collect_stats:
      out, st = res
      zero_f = jnp.zeros((), jnp.float32)
      self.sow(nnx.Intermediate, "attn_stats", {
          "local_max_abs_logit": zero_f, "local_mean_lse": zero_f,
          "global_max_abs_logit": st["max_abs_logit"], "global_mean_lse": st["mean_lse"]})
    else:
      out = res
    return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), new_cache


register_attention("mhsa", MultiHeadAttention)
