"""NNX and Linen LSAttention: agree with each other, with the op, and in the common decoder."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ls_attention
from common.config import tiny_config
from common.layers import apply_rope, rms_norm, rope_inv_freq
from common.model import Decoder
from ls_attention import linen as ls_linen
from tests.ls_attention.helpers import assert_close

TOL = 2e-5


def _cfg(**kw):
  base = dict(d_model=32, num_heads=4, num_kv_heads=2, num_local_heads=3, window=4,
              qk_norm=True, logits_soft_cap=5.0)
  base.update(kw)
  return ls_attention.layer_config(**base)


def _linen_params(nnx_layer):
  return {"params": nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))}


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_nnx_equals_op_and_linen(pos):
  cfg = _cfg(position_embedding=pos)
  layer = ls_attention.LSAttention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 32))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  y, cache = nnx.jit(lambda m, x: m(x, positions_BxT=positions))(layer, x)
  assert cache is None and y.shape == x.shape

  # the op by hand, from the same parameters
  p = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  q = (x @ p["q_proj"]["kernel"]).reshape(2, 11, 4, 8)
  k = (x @ p["k_proj"]["kernel"]).reshape(2, 11, 2, 8)
  v = (x @ p["v_proj"]["kernel"]).reshape(2, 11, 2, 8)
  q, k = rms_norm(q, p["q_norm"]["weight"], 1e-5), rms_norm(k, p["k_norm"]["weight"], 1e-5)
  if pos == "rope":
    inv = rope_inv_freq(8, 10000.0)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
  o = ls_attention.ls_attention(q, k, v, num_local_heads=3, window=4, logits_soft_cap=5.0,
                                implementation="reference")
  assert_close(y, o.reshape(2, 11, 32) @ p["o_proj"]["kernel"], TOL, "nnx vs op")

  lin = ls_linen.LSAttention.from_config(cfg)
  params = lin.init(jax.random.PRNGKey(2), x)
  assert jax.tree.structure(params) == jax.tree.structure(_linen_params(layer))
  y_lin, _ = jax.jit(lambda p, x: lin.apply(p, x, positions_BxT=positions))(
      _linen_params(layer), x)
  assert_close(y_lin, y, TOL, "linen vs nnx")


def test_linen_decode_equals_forward_and_sows_stats():
  lin = ls_linen.LSAttention(num_heads=4, num_local_heads=2, window=3, head_dim=8,
                             num_kv_heads=4, logits_soft_cap=10.0)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 14, 16))
  params = lin.init(jax.random.PRNGKey(4), x)
  full, _ = lin.apply(params, x)
  (y, _), state = lin.apply(params, x, collect_stats=True, mutable=["intermediates"])
  stats = state["intermediates"]["attn_stats"][0]
  assert float(stats["local_max_abs_logit"]) > 0 and float(stats["global_mean_lse"]) > 0
  apply = jax.jit(lambda p, x, c, i: lin.apply(p, x, cache=c, index=i))
  cache = lin.init_cache(1, 14)
  out, cache = apply(params, x[:, :2], cache, 0)
  outs = [out]
  for i in range(2, 14):
    out, cache = apply(params, x[:, i:i + 1], cache, i)
    outs.append(out)
  assert_close(jnp.concatenate(outs, 1), full, TOL, "linen decode")


def test_common_decoder_selects_ls_and_decodes():
  cfg = tiny_config(attention="ls", num_local_heads=3, window=4, num_heads=4, num_kv_heads=2,
                    attn_logits_soft_cap=30.0, qk_norm=True)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  assert isinstance(model.layers[0].self_attn, ls_attention.LSAttention)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 18), 0, cfg.vocab_size)
  logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
  cache = model.init_cache(2, 18)
  step = nnx.jit(lambda m, t, c: m(t, cache=c))
  out, cache = step(model, tokens[:, :5], cache)
  outs = [out]
  for i in range(5, 18):  # window 4: the ring wraps three times
    out, cache = step(model, tokens[:, i:i + 1], cache)
    outs.append(out)
  assert_close(jnp.concatenate(outs, 1), logits, 1e-4, "decoder decode vs forward")
  model(tokens, collect_stats=True)
  stats = nnx.pop(model, nnx.Intermediate)
  st = stats["layers"][0]["self_attn"]["attn_stats"][0]
  assert set(st) == {"local_max_abs_logit", "local_mean_lse", "global_max_abs_logit",
                     "global_mean_lse"}


def test_window_covering_sequence_equals_mhsa_decoder():
  cfg = tiny_config(attention="ls", num_local_heads=2, window=64, num_heads=4, num_kv_heads=2)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 16), 0, cfg.vocab_size)
  ls_logits, _ = Decoder(cfg, rngs=nnx.Rngs(7))(tokens)
  mhsa_logits, _ = Decoder(cfg.replace(attention="mhsa"), rngs=nnx.Rngs(7))(tokens)
  assert_close(ls_logits, mhsa_logits, 1e-5, "ls(window>=T) vs mhsa")


def test_module_validation():
  with pytest.raises(ValueError, match="implementation"):
    ls_attention.LSAttention(_cfg(implementation="nope"), rngs=nnx.Rngs(0))
  lin = ls_linen.LSAttention(num_heads=4, num_local_heads=5, window=3, head_dim=8)
  with pytest.raises(ValueError, match="num_local_heads"):
    lin.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 16)))


def test_common_sampler_with_left_padding_matches_greedy_forward():
  """The shared sampler (left-padded prompts, while_loop decode) runs an LS model exactly."""
  from common.sampler import SamplingConfig, generate, trim
  cfg = tiny_config(attention="ls", num_local_heads=3, window=4, num_heads=4, num_kv_heads=2)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
  new = trim(generate(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True)))
  for prompt, toks in zip(prompts, new):
    logits, _ = model(jnp.array([prompt + toks]))
    assert np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1)).tolist() == toks


def _grids(hlo):
  return sorted(tuple(int(x) for x in m.groups()) for m in re.finditer(
      r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", hlo))


def test_block_sizes_from_model_config_reach_the_gpu_kernels():
  """ModelConfig.attn_block_sizes -> NNX and Linen layers -> the kernels' grids (cuda lowering)."""
  B, T, H, KVH, D, NL, W = 2, 256, 4, 2, 16, 3, 32
  cfg = ls_attention.layer_config(d_model=H * D, num_heads=H, num_kv_heads=KVH,
                                  num_local_heads=NL, window=W, implementation="pallas",
                                  block_sizes={"block_q": 32, "block_q_bwd": 16})
  assert cfg.attn_block_sizes == {"block_q": 32, "block_q_bwd": 16}
  layer = ls_attention.LSAttention(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def fwd(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x, collect_stats=True)[0])

  x = jnp.ones((B, T, H * D), jnp.float32)
  hlo = jax.jit(jax.grad(fwd)).trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
  assert _grids(hlo) == sorted([(T // 32, B, H), (T // 16, B, H), (T // 64, B, H)])

  lin = ls_linen.LSAttention.from_config(cfg)
  assert lin.block_sizes == cfg.attn_block_sizes
  params = jax.eval_shape(lin.init, jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(lin.apply(p, x)[0]))).trace(params, x).lower(
      lowering_platforms=("cuda",)).as_text()
  assert _grids(hlo) == sorted([(T // 32, B, H), (T // 16, B, H), (T // 64, B, H)])


def test_bad_block_sizes_raise_at_the_boundary():
  with pytest.raises(ValueError, match="BlockSizes.block_q_bwd must be a power of two"):
    ls_attention.LSAttention(_cfg(block_sizes={"block_q_bwd": 48}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['bq'\]"):
    ls_attention.LSAttention(_cfg(block_sizes={"bq": 64}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tpu_global_block"):
    ls_linen.LSAttention.from_config(_cfg(block_sizes={"tpu_global_block": 100})).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4, 32)))


def test_nnx_layer_from_keywords_equals_from_config():
  from flax import nnx
  import jax
  import ls_attention
  kw = dict(d_model=32, num_heads=4, num_local_heads=3, window=4, num_kv_heads=2)
  a = ls_attention.LSAttention(rngs=nnx.Rngs(0), **kw)
  b = ls_attention.LSAttention(ls_attention.layer_config(**kw), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  np.testing.assert_array_equal(np.asarray(a(x)[0]), np.asarray(b(x)[0]))
  with pytest.raises(TypeError, match="not both"):
    ls_attention.LSAttention(ls_attention.layer_config(**kw), rngs=nnx.Rngs(0), window=3)
