"""AdaGC clips a planted per-tensor gradient spike to ~lambda x its EMA norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import adagc

NORMS = {"w": 2.0, "b": 0.1, "emb": 5.0}
SHAPES = {"w": (8, 4), "b": (4,), "emb": (16, 8)}


def _grads(rng, scale=None):
  """Random directions with norms NORMS * U[0.95, 1.0] (x scale for planted spikes)."""
  out = {}
  for k, shape in SHAPES.items():
    g = rng.normal(size=shape)
    out[k] = jnp.asarray(g / np.linalg.norm(g) * NORMS[k] * rng.uniform(0.95, 1.0)
                         * (scale or {}).get(k, 1.0), jnp.float32)
  return out


def _norm(x):
  return float(jnp.linalg.norm(x))


@pytest.mark.parametrize("jit", [False, True])
def test_spike_is_clipped_to_lambda_ema_and_normal_grads_pass(jit):
  rng = np.random.default_rng(0)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = adagc(lambda_rel=1.05, beta=0.98, warmup_steps=5, lambda_abs=100.0)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for _ in range(40):                                 # warm-up, then the EMA settles
    g = _grads(rng)
    out, state = update(g, state, params)
    for k in g:                                        # normal gradients are untouched
      np.testing.assert_allclose(out[k], g[k], rtol=1e-6)
    assert int(state.num_clipped) == 0
  gamma = {k: float(v) for k, v in state.gamma.items()}
  for k in NORMS:
    assert NORMS[k] * 0.94 < gamma[k] < NORMS[k] * 1.001
  spike = _grads(rng, scale={"w": 100.0})
  out, state = update(spike, state, params)
  np.testing.assert_allclose(_norm(out["w"]), 1.05 * gamma["w"], rtol=1e-5)
  np.testing.assert_allclose(out["w"] / _norm(out["w"]), spike["w"] / _norm(spike["w"]),
                             atol=1e-6)                # direction kept
  for k in ("b", "emb"):                               # other tensors: not shrunk (per-tensor)
    np.testing.assert_allclose(out[k], spike[k], rtol=1e-6)
  assert int(state.num_clipped) == 1
  # The EMA absorbs the clipped norm, not the spike.
  np.testing.assert_allclose(float(state.gamma["w"]),
                             0.98 * gamma["w"] + 0.02 * 1.05 * gamma["w"], rtol=1e-5)


def test_warmup_is_global_clipping_with_running_min():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
  tx = adagc(warmup_steps=3, lambda_abs=1.0)
  state = tx.init(params)
  g = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.zeros(4).at[0].set(12.0)}  # global norm 13
  out, state = tx.update(g, state)
  ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  for k in g:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6)
  np.testing.assert_allclose([state.gamma["a"], state.gamma["b"]], [5 / 13, 12 / 13], rtol=1e-6)
  small = {"a": jnp.array([0.1, 0.0, 0.0]), "b": jnp.zeros(4).at[1].set(0.2)}
  out, state = tx.update(small, state)                 # below threshold: unchanged
  np.testing.assert_allclose(out["a"], small["a"])
  np.testing.assert_allclose([state.gamma["a"], state.gamma["b"]], [0.1, 0.2], rtol=1e-6)


def test_no_warmup_starts_the_ema_at_the_first_norm():
  tx = adagc(warmup_steps=0)
  state = tx.init({"a": jnp.zeros(2)})
  _, state = tx.update({"a": jnp.array([3.0, 4.0])}, state)
  np.testing.assert_allclose(state.gamma["a"], 5.0)
  out, _ = tx.update({"a": jnp.array([300.0, 400.0])}, state)
  np.testing.assert_allclose(_norm(out["a"]), 1.05 * 5.0, rtol=1e-6)


def test_bad_arguments():
  for kw, field in ((dict(beta=1.0), "beta"), (dict(lambda_rel=0.0), "lambda_rel"),
                    (dict(warmup_steps=-1), "warmup_steps")):
    with pytest.raises(ValueError, match=f"^{field}"):
      adagc(**kw)
