"""make_optimizer: schedule shape, clipping choice, weight-decay mask, non-finite skip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import make_optimizer, warmup_cosine_schedule
from common.optim.adagc import AdaGCState


def test_warmup_cosine_schedule_values():
  f = warmup_cosine_schedule(1e-3, warmup_steps=10, total_steps=110, final_lr=1e-4)
  np.testing.assert_allclose(f(0), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(f(4), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(f(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(f(60), 1e-4 + 0.5 * 9e-4, rtol=1e-5)   # half-way: cos = 0
  np.testing.assert_allclose([f(110), f(500)], [1e-4, 1e-4], rtol=1e-5)
  lrs = np.asarray(jax.vmap(f)(jnp.arange(10, 111)))
  assert np.all(np.diff(lrs) <= 1e-12)
  with pytest.raises(ValueError, match="^optimizer.warmup_steps"):
    warmup_cosine_schedule(1e-3, warmup_steps=20, total_steps=10, final_lr=0.0)
  with pytest.raises(ValueError, match="^optimizer.lr"):
    warmup_cosine_schedule(1e-3, warmup_steps=1, total_steps=10, final_lr=1e-2)


def _params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "scale": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


def test_adamw_matches_optax_reference_with_clip_and_decay_mask():
  params = _params()
  g = jax.tree.map(lambda p: 10.0 * jnp.cos(p), params)            # global norm > 1: clipped
  tx, sched = make_optimizer(lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=10,
                             weight_decay=0.1, grad_clip=1.0)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                mask={"w": True, "scale": False}))
  s, r = tx.init(params), ref.init(params)
  for _ in range(3):
    u, s = tx.update(g, s, params)
    v, r = ref.update(g, r, params)
    for k in params:
      np.testing.assert_allclose(u[k], v[k], rtol=1e-6, atol=1e-9)


def test_adagc_replaces_global_clipping():
  tx, _ = make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=5, adagc=True,
                         adagc_warmup_steps=2)
  state = tx.init(_params())
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AdaGCState))
           if isinstance(x, AdaGCState)]
  assert len(found) == 1
  assert not any(isinstance(x, optax.ClipByGlobalNormState) for x in state)


def test_nonfinite_step_is_skipped_and_state_kept():
  params = _params()
  tx, _ = make_optimizer(lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=10, adagc=True,
                         adagc_warmup_steps=1, skip_nonfinite=True)
  step = jax.jit(tx.update)
  s0 = tx.init(params)
  g = jax.tree.map(jnp.sin, params)
  _, s1 = step(g, s0, params)
  bad = {"w": g["w"].at[0, 0].set(jnp.nan), "scale": g["scale"]}
  u, s2 = step(bad, s1, params)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  assert int(s2.total_notfinite) == 1 and not bool(s2.last_finite)
  for a, b in zip(jax.tree.leaves(s1.inner_state), jax.tree.leaves(s2.inner_state)):
    np.testing.assert_array_equal(a, b)
  u, s3 = step(g, s2, params)                                     # recovers on the next step
  assert bool(s3.last_finite) and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))


def test_no_warmup_and_one_step_warmup():
  f = warmup_cosine_schedule(1e-3, warmup_steps=0, total_steps=10, final_lr=0.0)
  np.testing.assert_allclose([f(0), f(5), f(10)], [1e-3, 5e-4, 0.0], atol=1e-9)
  g = warmup_cosine_schedule(1e-3, warmup_steps=1, total_steps=11, final_lr=0.0)
  np.testing.assert_allclose([g(0), g(1), g(6)], [1e-3, 1e-3, 5e-4], atol=1e-9)


def test_constant_lr_matches_grpo_chain():
  """total_steps=None: clip + AdamW with a constant lr and no decay mask (the GRPO recipe)."""
  params = _params()
  g = jax.tree.map(lambda p: 10.0 * jnp.cos(p), params)
  tx, sched = make_optimizer(lr=1e-3, b2=0.999, weight_decay=0.01, grad_clip=1.0,
                             decay_mask=None)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
  s, r = tx.init(params), ref.init(params)
  assert jax.tree.structure(s) == jax.tree.structure(r)
  assert float(sched(123)) == 1e-3
  for _ in range(3):
    u, s = tx.update(g, s, params)
    v, r = ref.update(g, r, params)
    for k in params:
      np.testing.assert_allclose(u[k], v[k], rtol=1e-6, atol=1e-9)
