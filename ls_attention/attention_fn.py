"""LS-attention as the `attention_fn` of Flax's own attention modules.

    import ls_attention
    from flax import nnx
    attn = nnx.MultiHeadAttention(
        num_heads=8, in_features=256, decode=False, rngs=nnx.Rngs(0),
        attention_fn=ls_attention.make_attention_fn(num_local_heads=6, window=128))

works the same for `flax.linen.MultiHeadDotProductAttention(attention_fn=...)`.

LS-attention is causal by definition: heads [0, num_local_heads) see the last `window` keys,
the others every earlier key. A `mask` from the module (Flax's causal mask, a padding mask, or
their combination) is AND-ed with that: if the mask is a concrete array that allows every pair
the LS mask allows (Flax's causal mask, or no mask), the fast op runs; any other mask goes
through a dense masked softmax in float32 (exact, O(T^2) memory).

Refused with a one-line error rather than computed wrongly:
  * `bias` (an additive logit bias) — LS-attention has none;
  * dropout on the attention weights (`dropout_rate > 0` and `deterministic=False`);
  * query length != key length, i.e. Flax's `decode=True` cache: each query's position is not
    known to the function (use `ls_attention.LSAttention` and its sliding-window cache);
  * `sow_weights=True` (no attention-weight matrix exists on the fast path).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ls_attention import ops
from ls_attention.reference import MASK_VALUE, ls_mask


def _dense_masked(q, k, v, mask_BxHxTxS, *, num_local_heads, window, logits_soft_cap):
  """Dense float32 LS-attention AND an extra boolean mask; rows with no key output 0."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if kvh != h:
    k = jnp.repeat(k, h // kvh, axis=2)
    v = jnp.repeat(v, h // kvh, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits / math.sqrt(d)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  visible = ls_mask(t, s, h, num_local_heads, window, q_offset=s - t)[None] & mask_BxHxTxS
  logits = jnp.where(visible, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32)).astype(q.dtype)


def _mask_is_implied(mask, t: int, s: int, num_heads: int, num_local_heads: int,
                     window: int) -> bool:
  """True if `mask` is concrete and allows every pair LS-attention allows (then AND-ing it
  changes nothing)."""
  if isinstance(mask, jax.core.Tracer):
    return False
  try:
    m = np.asarray(mask, bool)
  except Exception:  # not concrete (e.g. under a transformation)
    return False
  ls = np.asarray(ls_mask(t, s, num_heads, num_local_heads, window, q_offset=s - t))
  return bool(np.all(m | ~ls))


def make_attention_fn(*, num_local_heads: int, window: int, implementation: str = "auto",
                      logits_soft_cap: float | None = None, interpret: bool = False,
                      **op_kwargs):
  """A function with Flax's `attention_fn` signature computing LS-attention.

  Args are those of `ls_attention.ls_attention` (`num_local_heads` in [0, H], `window` >= 1,
  `implementation`, `logits_soft_cap`, `interpret`, and any further op keyword such as
  `block_sizes`). `num_local_heads` is checked against the head count at the first call.
  """
  ops.resolve_implementation(implementation)   # fail at construction for a bad name
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"make_attention_fn: window must be an int >= 1, got {window!r}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, is_causal=False, **unused):
    del broadcast_dropout, dropout_rng, precision, is_causal, unused
    if bias is not None:
      raise ValueError("ls_attention attention_fn: an additive `bias` is not supported "
                       "(LS-attention has none); pass bias=None")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError("ls_attention attention_fn: attention dropout is not supported; use "
                       "dropout_rate=0 or deterministic=True")
    if module is not None:
      raise ValueError("ls_attention attention_fn: sow_weights=True is not supported (the "
                       "fast path never forms the attention-weight matrix)")
    *batch, t, h, d = query.shape
    s = key.shape[-3]
    if t != s:
      raise ValueError(f"ls_attention attention_fn: query length {t} != key length {s} "
                       "(Flax's decode=True cache): LS-attention needs each query's position; "
                       "use ls_attention.LSAttention with its sliding-window cache")
    bsz = int(np.prod(batch)) if batch else 1
    q = query.reshape(bsz, t, h, d)
    k = key.reshape(bsz, s, key.shape[-2], d)
    v = value.reshape(bsz, s, value.shape[-2], value.shape[-1])
    ops.validate(q.shape, k.shape, v.shape, num_local_heads, window, logits_soft_cap)
    if mask is None or _mask_is_implied(mask, t, s, h, num_local_heads, window):
      out = ops.ls_attention(q, k, v, num_local_heads=num_local_heads, window=window,
                             implementation=implementation, logits_soft_cap=logits_soft_cap,
                             interpret=interpret, **op_kwargs)
    else:
      m = jnp.broadcast_to(jnp.asarray(mask, bool), (*batch, h, t, s)).reshape(bsz, h, t, s)
      out = _dense_masked(q, k, v, m, num_local_heads=num_local_heads, window=window,
                          logits_soft_cap=logits_soft_cap)
    out = out.reshape(*batch, t, h, v.shape[-1])
    return out.astype(dtype) if dtype is not None else out

  return attention_fn
