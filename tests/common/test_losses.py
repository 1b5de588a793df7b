"""Masked cross-entropy and z-loss against float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
