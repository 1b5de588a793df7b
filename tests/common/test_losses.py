"""Masked cross-entropy and z-loss against float64 numpy references."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from common import losses
from common.losses import cross_entropy, lm_loss, z_loss


def _np_lse(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


@pytest.fixture()
def data():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (2, 5, 11)) + 4.0          # offset: log Z far from 0
  targets = rng.integers(0, 11, (2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  return logits, targets, mask


@pytest.mark.parametrize("jit", [False, True])
def test_z_loss_matches_numpy(data, jit):
  logits, _, mask = data
  lse = _np_lse(logits)
  f = jax.jit(z_loss, static_argnames="coef") if jit else z_loss
  np.testing.assert_allclose(f(jnp.asarray(logits, jnp.float32)), 1e-4 * np.mean(lse**2),
                             rtol=1e-5)
  got = f(jnp.asarray(logits, jnp.float32), coef=0.3, mask_BxT=jnp.asarray(mask))
  np.testing.assert_allclose(got, 0.3 * (lse**2 * mask).sum() / mask.sum(), rtol=1e-5)


def test_cross_entropy_matches_numpy_and_bf16_is_upcast(data):
  logits, targets, mask = data
  nll = _np_lse(logits) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  got = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(got, (nll * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                             nll.mean(), rtol=1e-5)
  bf = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, nll.mean(), rtol=2e-2)


def test_lm_loss_adds_the_z_term_and_its_gradient_lowers_log_z(data):
  logits, targets, mask = data
  x = jnp.asarray(logits, jnp.float32)
  base, aux0 = lm_loss(x, jnp.asarray(targets), jnp.asarray(mask))
  with_z, aux = lm_loss(x, jnp.asarray(targets), jnp.asarray(mask), z_loss_coef=1e-2)
  np.testing.assert_allclose(with_z - base, 1e-2 * aux["z_loss"], rtol=1e-5)
  np.testing.assert_allclose(aux0["ce"], base, rtol=1e-6)
  # A gradient step on the z-loss alone lowers mean log Z (the logits' common level).
  g = jax.grad(lambda l: z_loss(l, coef=1.0))(x)
  assert float(jnp.mean(jax.nn.logsumexp(x - 0.01 * g, -1))) < float(aux["lse_mean"])


def test_shape_errors(data):
  logits, targets, _ = data
  with pytest.raises(ValueError, match="^targets"):
    cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :3]))
  with pytest.raises(ValueError, match="^mask"):
    z_loss(jnp.asarray(logits), mask_BxT=jnp.ones((3,)))


# ------------------------------------------------------------------ chunked over tokens ---


def _hidden_data(b=2, t=13, d=8, v=37, seed=1):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(0, 1, (b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(0, 1, (d, v)) + 0.3, jnp.float32)   # offset: log Z far from 0
  tgt = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray((rng.random((b, t)) > 0.3).astype(np.float32))
  return h, w, tgt, mask


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 26, 100])   # 26 = B*T; 5, 8 leave a padded chunk
def test_chunked_lm_loss_and_grads_equal_dense(jit, chunk):
  h, w, tgt, mask = _hidden_data()

  def dense(h, w):
    return lm_loss(jnp.dot(h, w), tgt, mask, z_loss_coef=1e-2)

  def chunked(h, w):
    return losses.chunked_lm_loss(h, w, tgt, mask, z_loss_coef=1e-2, chunk_tokens=chunk)

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  if jit:
    dense, chunked = jax.jit(dense), jax.jit(chunked)
  (l0, aux0), g0 = grad(dense)(h, w)
  (l1, aux1), g1 = grad(chunked)(h, w)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for k in ("ce", "z_loss", "lse_mean"):
    np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-6)
  assert float(jnp.abs(g0[0]).max()) > 0 and float(jnp.abs(g0[1]).max()) > 0
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_logprobs_equal_log_softmax_with_temperature():
  h, w, tgt, _ = _hidden_data(b=3, t=7, v=50)
  want = jnp.take_along_axis(jax.nn.log_softmax(jnp.dot(h, w) / 0.7, -1), tgt[..., None],
                             -1)[..., 0]
  got = losses.chunked_token_logprobs(h, w, tgt, chunk_tokens=4, temperature=0.7)
  assert got.shape == (3, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gw = jax.grad(lambda w: jnp.sum(jax.nn.log_softmax(jnp.dot(h, w) / 0.7, -1)
                                  * jax.nn.one_hot(tgt, 50)))(w)
  gc = jax.grad(lambda w: jnp.sum(losses.chunked_token_logprobs(h, w, tgt, chunk_tokens=4,
                                                                 temperature=0.7)))(w)
  np.testing.assert_allclose(gc, gw, rtol=1e-5, atol=1e-6)


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation produces, nested jaxprs (scan, remat) included."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      biggest = max(biggest, _largest_intermediate(sub))
  return biggest


def test_chunked_loss_never_builds_the_full_logits():
  b, t, d, v, chunk = 2, 64, 8, 512, 16
  h, w, tgt, mask = _hidden_data(b=b, t=t, d=d, v=v)
  f = lambda h, w: losses.chunked_lm_loss(h, w, tgt, mask, z_loss_coef=1e-4,
                                          chunk_tokens=chunk)[0]
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w).jaxpr
  assert _largest_intermediate(jaxpr) <= max(chunk * v, b * t * d, d * v)
  dense = lambda h, w: lm_loss(jnp.dot(h, w), tgt, mask)[0]
  assert _largest_intermediate(jax.make_jaxpr(jax.grad(dense, argnums=(0, 1)))(h, w).jaxpr) \
      >= b * t * v   # the check can fail: the dense loss does build them


def test_chunked_shape_errors():
  h, w, tgt, _ = _hidden_data()
  with pytest.raises(ValueError, match="^hidden/head"):
    losses.chunked_lm_loss(h, w[:3], tgt)
  with pytest.raises(ValueError, match="^targets"):
    losses.chunked_lm_loss(h, w, tgt[:, :3])
  with pytest.raises(ValueError, match="^chunk_tokens"):
    losses.chunked_lm_loss(h, w, tgt, chunk_tokens=0)
