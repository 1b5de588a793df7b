"""The pure GRPO update: micro-batch gradient accumulation and chunked scoring."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_grpo import algorithm as A
from test_learner import PROBLEMS, make


def test_micro_batches_accumulate_gradients_and_chunk_scoring():
  tr, params = make("soft_gumbel")
  cfg = dataclasses.replace(tr.cfg, grpo=dataclasses.replace(tr.cfg.grpo, micro_batch_rows=2))
  assert cfg.grpo.num_micro_batches == 4       # 8 rows/update -> 4 micro-batches
  out, _, _ = tr.generate(params, PROBLEMS[:2], 4, jax.random.key(3))
  rc = cfg.rollout
  full = jax.jit(A.score_actions, static_argnums=(0, 3))(tr.graphdef, params, out, rc)
  chunked = jax.jit(A.score_in_chunks, static_argnums=(0, 3, 4))(tr.graphdef, params, out, rc, 4)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5)
  rng = np.random.RandomState(0)
  batch = {"rollout": out, "advantages_B": jnp.asarray(rng.randn(8), jnp.float32),
           "old_logp_BxN": full + 0.05 * jnp.asarray(rng.randn(*full.shape), jnp.float32),
           "ref_logp_BxN": full}
  state = A.init_state(params, cfg)
  new, metrics = jax.jit(functools.partial(A.update_step, graphdef=tr.graphdef, cfg=cfg))(
      state, batch)
  # Reference: mean of the per-micro-batch gradients (rows j, j+4, ...), then one AdamW step.
  grad = jax.jit(jax.grad(A.grpo_objective, has_aux=True), static_argnums=(1, 3))
  gs = [grad(params, tr.graphdef, jax.tree.map(lambda x: x[j::4], batch), cfg)[0]
        for j in range(4)]
  g = jax.tree.map(lambda *x: sum(x) / 4, *gs)
  upd, _ = A.make_optimizer(cfg.optim).update(g, state.opt_state, state.params)
  want = jax.tree.map(lambda p, u: p + u, state.params, upd)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]),
                             float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))),
                             rtol=1e-4)
  with pytest.raises(ValueError, match=r"^grpo\.micro_batch_rows: got 3; allowed: "):
    dataclasses.replace(tr.cfg.grpo, micro_batch_rows=3)
