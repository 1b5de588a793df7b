"""Decoder-only transformer (Llama / Qwen2 family) in Flax NNX.

Accepts token ids or input embeddings (soft thinking feeds probability-weighted mixtures of
embeddings) and returns logits. A `DecodeCache` supports prefill and single-token decode;
see common/attention.py for the slot convention (left-padded rows, `start_B`).

Memory in training: `ModelConfig.remat` rematerialises each block (jax.checkpoint policy), and
`model(..., return_hidden=True)` returns the final normed hidden states instead of the
[B, T, V] logits, so a loss can apply `head_DxV` chunk by chunk (common/losses.py).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from common.attention import get_attention_cls
from common.config import ModelConfig
from common.layers import MLP, Linear, RMSNorm, dtype_of


# ModelConfig.remat -> jax.checkpoint policy (None: save nothing but the block's inputs).
# "dots" is MaxText's "minimal": keep the projection/MLP matmul outputs, recompute the
# attention scores and element-wise ops (batched dots such as q.k are not kept).
_REMAT_POLICIES = {"full": None,
                   "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _after(residuals, ct):
  """`residuals`, made data-dependent on the cotangent `ct` (values unchanged unless ct[0] is
  NaN, when the step is non-finite anyway and skipped)."""
  first = jax.tree.leaves(ct)[0].reshape(-1)[0]
  late = jnp.isnan(first)
  return jax.tree.map(
      lambda r: jnp.where(late, jnp.zeros_like(r), r)
      if jnp.issubdtype(r.dtype, jnp.inexact) else r, residuals)


def ordered_remat(f, policy=None):
  """`jax.checkpoint(f, policy=policy)` whose backward recomputation waits for its cotangent.

  Plain jax.checkpoint relies on optimization barriers to keep the recomputation in the
  backward pass; XLA:CPU drops them, then hoists every block's recomputation to the start of
  the backward pass (or CSEs it with the forward), and peak memory is as without remat
  (measured: temp bytes grow with depth either way). Gating the saved residuals on the incoming
  cotangent is a real data dependency, so every backend recomputes block i only when block
  i+1's backward is done. Same values and gradients as f.
  """
  @jax.custom_vjp
  def g(*args):
    return f(*args)

  def fwd(*args):
    return jax.vjp(jax.checkpoint(f, policy=policy), *args)

  def bwd(vjp_fn, ct):
    return _after(vjp_fn, ct)(ct)

  g.defvjp(fwd, bwd)
  return g


def _remat_layer_forward(layer, x_BxTxD, positions_BxT, start_B, index, *, collect_stats,
                         policy):
  """One training-mode block under `ordered_remat`; its sown attn_stats land on `layer`.

  The attention and MLP sub-blocks are rematerialised separately: the backward pass then holds
  one sub-block's internals at a time (their max, not their sum) for one more [B, T, D] residual.
  """
  graphdef, state = nnx.split(layer)

  def attention(state, x_BxTxD, positions_BxT, start_B, index):
    block = nnx.merge(graphdef, state)
    y_BxTxD, _ = block.attention_block(x_BxTxD, positions_BxT=positions_BxT, start_B=start_B,
                                       cache=None, index=index, collect_stats=collect_stats)
    return y_BxTxD, nnx.pop(block, nnx.Intermediate)

  def mlp(state, x_BxTxD):
    return nnx.merge(graphdef, state).mlp_block(x_BxTxD)

  x_BxTxD, stats = ordered_remat(attention, policy)(state, x_BxTxD, positions_BxT, start_B,
                                                    index)
  x_BxTxD = ordered_remat(mlp, policy)(state, x_BxTxD)
  nnx.update(layer, stats)
  return x_BxTxD, None


@flax.struct.dataclass
class DecodeCache:
  layers: list                  # one attention-specific cache per layer
  index: jax.Array              # int32 []: the slot the next token is written to
  start_B: jax.Array            # int32 [B]: first valid slot of each (left-padded) row
  max_len: int = flax.struct.field(pytree_node=False, default=0)

  def repeat_rows(self, g: int) -> "DecodeCache":
    """Each row repeated g times in place (row b -> rows b*g .. b*g+g-1): rows that continue
    the same prefix (GRPO groups) share one prefill. Every cache leaf is batch-first."""
    repeat = lambda x: jnp.repeat(x, g, axis=0)
    return self.replace(layers=jax.tree.map(repeat, self.layers), start_B=repeat(self.start_B))


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pdt = dtype_of(config.param_dtype)
    self.input_layernorm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=pdt)
    self.self_attn = get_attention_cls(config.attention)(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.d_model, eps=config.rms_norm_eps,
                                            param_dtype=pdt)
    self.mlp = MLP(config, rngs=rngs)

  def attention_block(self, x_BxTxD, *, positions_BxT, start_B, cache, index, collect_stats):
    h, new_cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT=positions_BxT,
                                  start_B=start_B, cache=cache, index=index,
                                  collect_stats=collect_stats)
    return x_BxTxD + h, new_cache

  def mlp_block(self, x_BxTxD):
    return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))

  def __call__(self, x_BxTxD, *, positions_BxT, start_B, cache, index, collect_stats):
    x_BxTxD, new_cache = self.attention_block(x_BxTxD, positions_BxT=positions_BxT,
                                              start_B=start_B, cache=cache, index=index,
                                              collect_stats=collect_stats)
    return self.mlp_block(x_BxTxD), new_cache


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

  @property
  def head_DxV(self):
    """The LM head as a [D, V] matrix (tied: the embedding table transposed), compute dtype."""
    dt = dtype_of(self.config.dtype)
    if self.lm_head is None:
      return self.embedding_table_VxD.astype(dt).T
    return self.lm_head.kernel[...].astype(dt)

  def logits(self, h_BxTxD):
    """Final normed hidden states -> float32 logits (what `__call__` returns)."""
    if self.lm_head is None:
      logits = jnp.dot(h_BxTxD, self.embedding_table_VxD.astype(h_BxTxD.dtype).T)
    else:
      logits = self.lm_head(h_BxTxD)
    return logits.astype(jnp.float32)

  def embed(self, tokens_BxT):
    return self.embed_tokens(tokens_BxT)

  def init_cache(self, batch_size: int, max_len: int, *, start_B=None, dtype=None) -> DecodeCache:
    layers = [layer.self_attn.init_cache(batch_size, max_len, dtype) for layer in self.layers]
    if start_B is None:
      start_B = jnp.zeros((batch_size,), jnp.int32)
    return DecodeCache(layers=layers, index=jnp.zeros((), jnp.int32),
                       start_B=jnp.asarray(start_B, jnp.int32), max_len=max_len)

  def shared_prefix_hidden(self, prefix, suffix, *, start_P, rows_per_prefix: int):
    """Final normed hidden states [P * G, S, D] of `suffix` rows that continue shared prefixes.

    Row b of `suffix` continues prefix b // G (G = `rows_per_prefix`; in GRPO the G completions
    of a group share their prompt). Each prefix runs through the model once and its keys and
    values are repeated for its G rows (a `DecodeCache` prefill, then one multi-token call), so
    the prefix costs 1/G of the plain forward; values and gradients (the repeat's backward sums
    the G rows' contributions) equal those of `self` on the rows [prefix of the row, suffix] at
    the suffix positions, up to float reduction order. No remat: the cached path keeps its
    activations (`ModelConfig.remat` applies to the plain forward).

    prefix: [P, T] token ids or [P, T, D] input embeddings, left-padded; `start_P` [P] its
    first valid slot. suffix: [P * G, S] ids or [P * G, S, D] embeddings (no padding inside).
    """
    def call(x, cache):
      if jnp.issubdtype(x.dtype, jnp.integer):
        return self(x, cache=cache, return_hidden=True)
      return self(embeds_BxTxD=x, cache=cache, return_hidden=True)

    p, t = prefix.shape[:2]
    g = int(rows_per_prefix)
    if suffix.shape[0] != p * g:
      raise ValueError(f"shared_prefix_hidden: {suffix.shape[0]} suffix rows for {p} prefixes "
                       f"x rows_per_prefix {g}; allowed: exactly {p * g}")
    cache = self.init_cache(p, t + suffix.shape[1], start_B=start_P)
    _, cache = call(prefix, cache)
    h, _ = call(suffix, cache.repeat_rows(g))
    return h

  def __call__(self, tokens_BxT=None, *, embeds_BxTxD=None, cache: DecodeCache | None = None,
               start_B=None, collect_stats: bool = False, return_hidden: bool = False):
    """-> (logits_BxTxV float32, new cache or None); with return_hidden=True the first item is
    the final normed hidden state h_BxTxD instead (logits = self.logits(h))."""
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
    # Remat only pays off where there is a backward pass; decoding (cache) never remats.
    remat = self.config.remat != "none" and cache is None
    for i, layer in enumerate(self.layers):
      if remat:
        x, layer_cache = _remat_layer_forward(layer, x, positions_BxT, start_B, index,
                                              collect_stats=collect_stats,
                                              policy=_REMAT_POLICIES[self.config.remat])
      else:
        x, layer_cache = layer(x, positions_BxT=positions_BxT, start_B=start_B,
                               cache=None if cache is None else cache.layers[i], index=index,
                               collect_stats=collect_stats)
      new_layers.append(layer_cache)
    x = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = cache.replace(layers=new_layers, index=cache.index + t)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache
