"""Decoder memory options: block rematerialisation and the hidden-state output.

Remat must not change anything but memory: same loss, gradients and attention stats as
without; and it must actually lower memory on this backend (XLA:CPU drops the optimization
barriers plain jax.checkpoint relies on, see common.model.ordered_remat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ls_attention  # noqa: F401  (registers attention="ls")
from common import losses
from common.config import tiny_config
from common.model import Decoder


def _cfg(attention, remat, **kw):
  ls = dict(num_local_heads=2, window=4) if attention == "ls" else {}
  return tiny_config(attention=attention, remat=remat, **ls, **kw)


def _loss_and_grads(cfg, tokens_BxT, targets_BxT, start_B=None):
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    m = nnx.merge(graphdef, params, rest)
    logits, _ = m(tokens_BxT, collect_stats=True, start_B=start_B)
    stats = nnx.to_pure_dict(nnx.pop(m, nnx.Intermediate))
    return losses.cross_entropy(logits, targets_BxT), stats

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.mark.parametrize("attention", ["mhsa", "ls"])
@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_same_loss_grads_and_stats(attention, remat):
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(0, 256, (2, 24)), jnp.int32)
  tgt = jnp.asarray(rng.integers(0, 256, (2, 24)), jnp.int32)
  # Left-padded rows (the GRPO scorer's case) for the MHSA variant, unpadded for LS.
  start_B = jnp.asarray([0, 5], jnp.int32) if attention == "mhsa" else None
  (l0, s0), g0 = _loss_and_grads(_cfg(attention, "none"), tok, tgt, start_B)
  (l1, s1), g1 = _loss_and_grads(_cfg(attention, remat), tok, tgt, start_B)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1) and max(float(jnp.abs(g).max()) for g in flat0) > 0
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert jax.tree.structure(s0) == jax.tree.structure(s1) and jax.tree.leaves(s0)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(b, a, rtol=1e-6)


def _backward_temp_bytes(remat, num_layers):
  cfg = tiny_config(remat=remat, num_layers=num_layers, d_model=32, num_heads=4, num_kv_heads=4,
                    head_dim=8, mlp_dim=64, vocab_size=64, max_position_embeddings=512)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tok = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  loss = lambda p, t: jnp.mean(nnx.merge(graphdef, p)(t, return_hidden=True)[0] ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, tok).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_memory_does_not_grow_with_depth():
  # Attention scores (2 x 4 x 512 x 512 float32 = 8 MiB per layer) dominate: without remat every
  # layer keeps its own; with remat only the block being differentiated holds them.
  none_2, none_6 = _backward_temp_bytes("none", 2), _backward_temp_bytes("none", 6)
  full_2, full_6 = _backward_temp_bytes("full", 2), _backward_temp_bytes("full", 6)
  assert none_6 - none_2 > 3 * 8 * 2**20
  assert full_6 - full_2 < 0.25 * (none_6 - none_2)


def test_return_hidden_and_logits_equal_default_call():
  for tie in (True, False):
    cfg = tiny_config(tie_word_embeddings=tie)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    tok = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 9)), jnp.int32)
    logits, _ = model(tok)
    h, cache = model(tok, return_hidden=True)
    assert cache is None and h.shape == (2, 9, cfg.d_model)
    np.testing.assert_array_equal(model.logits(h), logits)
    np.testing.assert_allclose(jnp.dot(h, model.head_DxV), logits, rtol=1e-5, atol=1e-6)


def test_remat_is_validated():
  with pytest.raises(ValueError, match=r"^model\.remat: got .*; allowed: "):
    tiny_config(remat="everything")
