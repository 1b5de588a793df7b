"""Building blocks shared by every attention variant: RMSNorm, RoPE, SwiGLU MLP.

The pure functions (`rms_norm`, `rope_inv_freq`, `apply_rope`) are usable without Flax;
the NNX modules only hold parameters and call them. Parameter names follow Hugging Face
(`weight` of a norm, `*_proj` linears) so weight import is a rename, not a puzzle.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import ModelConfig


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def dtype_name(dtype) -> str:
  """"float32", jnp.float32, np.float32 or np.dtype("float32") -> "float32" (the config's
  spelling); anything that is not a dtype is returned as given for the caller to reject."""
  if isinstance(dtype, str):
    return dtype
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return dtype


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32 (as HF Llama does), returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(var + eps)
  return (weight.astype(jnp.float32) * y).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None):
  """Inverse frequencies [head_dim/2], with Llama-3 frequency scaling when configured.

  Llama-3 scaling follows HF `_compute_llama3_parameters` (modeling_rope_utils.py).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not rope_scaling:
    return inv_freq
  kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
  if kind == "default":
    return inv_freq
  factor = float(rope_scaling["factor"])
  low = float(rope_scaling.get("low_freq_factor", 1.0))
  high = float(rope_scaling.get("high_freq_factor", 4.0))
  old_len = float(rope_scaling.get("original_max_position_embeddings", 8192))
  low_wavelen = old_len / low
  high_wavelen = old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxTxHxD, positions_BxT, inv_freq):
  """Rotary embedding in HF's "rotate_half" layout (first half / second half of D)."""
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  x32 = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel stored [in, out]."""

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, init_std: float | None = None):
    std = init_std if init_std is not None else 1.0 / math.sqrt(d_in)
    self.kernel = nnx.Param(
        (std * jax.random.truncated_normal(rngs.params(), -2, 2, (d_in, d_out))).astype(param_dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dt, pdt = dtype_of(config.dtype), dtype_of(config.param_dtype)
    kw = dict(use_bias=False, rngs=rngs, dtype=dt, param_dtype=pdt)
    self.gate_proj = Linear(config.d_model, config.mlp_dim, **kw)
    self.up_proj = Linear(config.d_model, config.mlp_dim, **kw)
    self.down_proj = Linear(config.mlp_dim, config.d_model, **kw)

  def __call__(self, x_BxTxD):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))
