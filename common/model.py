"""Decoder-only transformer (Llama / Qwen2 family) in Flax NNX.

Accepts token ids or input embeddings (soft thinking feeds probability-weighted mixtures of
embeddings) and returns logits. A `DecodeCache` supports prefill and single-token decode;
see common/attention.py for the slot convention (left-padded rows, `start_B`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from common.attention import get_attention_cls
from common.config import ModelConfig
from common.layers import MLP, Linear, RMSNorm, dtype_of


@flax.struct.dataclass
class DecodeCache:
  layers: list                  # one attention-specific cache per layer
  index: jax.Array              # int32 []: the slot the next token is written to
  start_B: jax.Array            # int32 [B]: first valid slot of each (left-padded) row
  max_len: int = flax.struct.field(pytree_node=False, default=0)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pdt = dtype_of(config.param_dtype)
    self.input_layernorm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=pdt)
    self.self_attn = get_attention_cls(config.attention)(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.d_model, eps=config.rms_norm_eps,
                                            param_dtype=pdt)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BxTxD, *, positions_BxT, start_B, cache, index, collect_stats):
    h, new_cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT=positions_BxT,
                                  start_B=start_B, cache=cache, index=index,
                                  collect_stats=collect_stats)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
    return x_BxTxD, new_cache


class Decoder(nnx.Module):
  """The shared causal LM. `model(tokens)` -> (logits_BxTxV, cache or None)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = dtype_of(config.dtype), dtype_of(config.param_dtype)
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, dtype=dt, param_dtype=pdt,
                                  embedding_init=init, rngs=rngs)
    if config.position_embedding == "learned":
      self.embed_positions = nnx.Embed(config.max_position_embeddings, config.d_model, dtype=dt,
                                       param_dtype=pdt, embedding_init=init, rngs=rngs)
    else:
      self.embed_positions = None
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=pdt)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(config.d_model, config.vocab_size, use_bias=False, rngs=rngs,
                            dtype=dt, param_dtype=pdt, init_std=0.02)

  @property
  def embedding_table_VxD(self):
    return self.embed_tokens.embedding[...]

  def embed(self, tokens_BxT):
    return self.embed_tokens(tokens_BxT)

  def init_cache(self, batch_size: int, max_len: int, *, start_B=None, dtype=None) -> DecodeCache:
    layers = [layer.self_attn.init_cache(batch_size, max_len, dtype) for layer in self.layers]
    if start_B is None:
      start_B = jnp.zeros((batch_size,), jnp.int32)
    return DecodeCache(layers=layers, index=jnp.zeros((), jnp.int32),
                       start_B=jnp.asarray(start_B, jnp.int32), max_len=max_len)

  def __call__(self, tokens_BxT=None, *, embeds_BxTxD=None, cache: DecodeCache | None = None,
               start_B=None, collect_stats: bool = False):
    if (tokens_BxT is None) == (embeds_BxTxD is None):
      raise ValueError("Decoder: pass exactly one of tokens_BxT or embeds_BxTxD")
    x = self.embed(tokens_BxT) if embeds_BxTxD is None else embeds_BxTxD.astype(
        dtype_of(self.config.dtype))
    b, t, _ = x.shape
    if cache is not None:
      index, start_B = cache.index, cache.start_B
    else:
      index = jnp.zeros((), jnp.int32)
      if t > self.config.max_position_embeddings and self.embed_positions is not None:
        raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                         f"{self.config.max_position_embeddings}")
    # start_B stays None for unpadded batches so attention layers can skip padding masks
    # (e.g. LS-attention then calls its Pallas kernel without a fallback branch).
    offset_B = jnp.zeros((b,), jnp.int32) if start_B is None else start_B
    positions_BxT = jnp.maximum(index + jnp.arange(t)[None, :] - offset_B[:, None], 0)
    if self.embed_positions is not None:
      x = x + self.embed_positions(positions_BxT)
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions_BxT=positions_BxT, start_B=start_B,
                             cache=None if cache is None else cache.layers[i], index=index,
                             collect_stats=collect_stats)
      new_layers.append(layer_cache)
    x = self.norm(x)
    if self.lm_head is None:
      logits = jnp.dot(x, self.embedding_table_VxD.astype(x.dtype).T)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    new_cache = None
    if cache is not None:
      new_cache = cache.replace(layers=new_layers, index=cache.index + t)
    return logits, new_cache
