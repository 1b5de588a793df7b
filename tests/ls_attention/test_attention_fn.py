"""make_attention_fn inside Flax's own nnx.MultiHeadAttention and linen.MultiHeadDotProductAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import ls_attention
from ls_attention.reference import ls_mask

H, D, T, W, LOCAL = 4, 8, 24, 5, 3


def _dense_fn(extra_mask_fn=None):
  """Flax's own dot_product_attention with the LS mask (AND an optional extra mask)."""
  def fn(query, key, value, mask=None, **kw):
    ls = ls_mask(query.shape[-3], key.shape[-3], H, LOCAL, W)[None]
    m = ls if mask is None else ls & mask.astype(bool)
    return nnx.dot_product_attention(query, key, value, mask=m, dtype=kw.get("dtype"))
  return fn


def _nnx_pair(**kw):
  common = dict(num_heads=H, in_features=H * D, qkv_features=H * D, decode=False, **kw)
  ours = nnx.MultiHeadAttention(
      attention_fn=ls_attention.make_attention_fn(num_local_heads=LOCAL, window=W),
      rngs=nnx.Rngs(0), **common)
  ref = nnx.MultiHeadAttention(attention_fn=_dense_fn(), rngs=nnx.Rngs(0), **common)
  return ours, ref


def test_nnx_mha_matches_dense_ls_mask():
  ours, ref = _nnx_pair()
  x = jax.random.normal(jax.random.key(1), (2, T, H * D))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(ours, x), ref(x), rtol=1e-5, atol=1e-5)


def test_nnx_mha_padding_mask_is_combined():
  ours, ref = _nnx_pair()
  x = jax.random.normal(jax.random.key(2), (2, T, H * D))
  valid = np.ones((2, T), bool)
  valid[1, T - 7:] = False            # right padding of row 1
  pad = nnx.make_attention_mask(valid, valid)   # [B, 1, T, T]
  got, want = ours(x, mask=pad), ref(x, mask=pad)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, :T - 7], want[1, :T - 7], rtol=1e-5, atol=1e-5)
  # padded keys are excluded: row 1's last valid query differs from the unmasked result
  unmasked = ours(x)
  np.testing.assert_allclose(unmasked[1, :T - 7], got[1, :T - 7], rtol=1e-5, atol=1e-5)  # causal
  assert not np.allclose(unmasked[1, T - 1], got[1, T - 1])
  # traced mask (under jit) takes the dense path and agrees
  jit_got = jax.jit(lambda m, x, p: m(x, mask=p))(ours, x, pad)
  np.testing.assert_allclose(jit_got, got, rtol=1e-5, atol=1e-5)


def test_linen_mhdpa_with_flax_causal_mask():
  x = jax.random.normal(jax.random.key(3), (2, T, H * D))
  causal = linen.make_causal_mask(jnp.ones((2, T)))
  ours = linen.MultiHeadDotProductAttention(
      num_heads=H, qkv_features=H * D,
      attention_fn=ls_attention.make_attention_fn(num_local_heads=LOCAL, window=W))
  ref = linen.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D,
                                           attention_fn=_dense_fn())
  params = ours.init(jax.random.key(0), x, mask=causal)
  got = ours.apply(params, x, mask=causal)
  want = ref.apply(params, x, mask=causal)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # gradients flow and agree
  g1 = jax.grad(lambda p: jnp.sum(ours.apply(p, x, mask=causal) ** 2))(params)
  g2 = jax.grad(lambda p: jnp.sum(ref.apply(p, x, mask=causal) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


def test_local_heads_really_windowed():
  fn = ls_attention.make_attention_fn(num_local_heads=H, window=1)
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  q, k, v = (jax.random.normal(kk, (1, T, H, D)) for kk in (k1, k2, k3))
  np.testing.assert_allclose(fn(q, k, v), v, rtol=1e-5, atol=1e-5)  # window 1: sees itself


def test_refusals_are_one_line():
  fn = ls_attention.make_attention_fn(num_local_heads=2, window=4)
  q = jnp.ones((1, 6, H, D))
  for kwargs, what in ((dict(bias=jnp.zeros((1, H, 6, 6))), "bias"),
                       (dict(dropout_rate=0.1, deterministic=False), "dropout"),
                       (dict(module=object()), "sow_weights")):
    with pytest.raises(ValueError, match=what) as e:
      fn(q, q, q, **kwargs)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="decode=True"):
    fn(q[:, :1], q, q)
  with pytest.raises(ValueError, match="num_local_heads"):
    ls_attention.make_attention_fn(num_local_heads=H + 1, window=4)(q, q, q)
  with pytest.raises(ValueError, match="window"):
    ls_attention.make_attention_fn(num_local_heads=1, window=0)


def test_nnx_decode_cache_is_refused_not_wrong():
  mha = nnx.MultiHeadAttention(
      num_heads=H, in_features=H * D, decode=True, rngs=nnx.Rngs(0),
      attention_fn=ls_attention.make_attention_fn(num_local_heads=LOCAL, window=W))
  mha.init_cache((1, T, H * D))
  with pytest.raises(ValueError, match="decode=True"):
    mha(jnp.ones((1, 1, H * D)))
