"""The pure GRPO update: micro-batch gradient accumulation, chunked scoring, loss aggregation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_grpo import algorithm as A
from test_learner import PROBLEMS, make


@pytest.mark.parametrize("loss_agg", ["token_mean", "token_mean_per_micro"])
def test_micro_batches_accumulate_gradients_and_chunk_scoring(loss_agg):
  """Memory micro-batches (rows j, j+4, ...) only bound memory: the accumulated gradient is
  the gradient of the whole mini-batch's loss under `loss_agg` (issue 11 item 4)."""
  tr, params = make("soft_gumbel")
  loss_cfg = dataclasses.replace(tr.cfg.loss, loss_agg=loss_agg, loss_agg_micro_rows=2)
  # eps = 1: the first AdamW step is ~ -lr * g (linear in g) instead of -lr * sign(g), so
  # comparing parameters compares gradients, their scale included.
  whole = dataclasses.replace(tr.cfg, loss=loss_cfg,
                              optim=dataclasses.replace(tr.cfg.optim, eps=1.0))
  cfg = dataclasses.replace(whole, grpo=dataclasses.replace(whole.grpo, micro_batch_rows=2))
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
  # Reference: the gradient of the whole mini-batch's loss (its own weights), one AdamW step.
  grad = jax.jit(jax.grad(A.grpo_objective, has_aux=True), static_argnums=(1, 3))
  g, m_whole = grad(params, tr.graphdef, batch, whole)
  upd, _ = A.make_optimizer(cfg.optim).update(g, state.opt_state, state.params)
  want = jax.tree.map(lambda p, u: p + u, state.params, upd)
  for a, b, p0 in zip(jax.tree.leaves(new.params), jax.tree.leaves(want),
                      jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a) - np.asarray(p0), np.asarray(b) - np.asarray(p0),
                               rtol=1e-3, atol=3e-8)   # updates ~1e-6; params ~1 (ulp 6e-8)
  np.testing.assert_allclose(float(metrics["grad_norm"]),
                             float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))),
                             rtol=1e-4)
  for k in ("loss", "pg_loss", "kl"):
    np.testing.assert_allclose(float(metrics[k]), float(m_whole[k]), rtol=1e-4, atol=1e-7)
  # The loss is the formula: token-mean over the 8 rows, or the mean over the 4 consecutive
  # 2-row micro-batches of their token-means (verl).
  mask = np.asarray(out.action_mask_BxN, np.float64)
  logp, old = np.asarray(full, np.float64), np.asarray(batch["old_logp_BxN"], np.float64)
  a = np.asarray(batch["advantages_B"], np.float64)[:, None] * mask
  r = np.exp(logp - old)
  c = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.2))
  tok = np.where(a < 0, np.minimum(c, -3 * a), c) * mask
  pg = (tok.sum() / mask.sum() if loss_agg == "token_mean" else
        np.mean(tok.reshape(4, -1).sum(-1) / mask.reshape(4, -1).sum(-1)))
  np.testing.assert_allclose(float(m_whole["pg_loss"]), pg, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match=r"^grpo\.micro_batch_rows: got 3; allowed: "):
    dataclasses.replace(tr.cfg.grpo, micro_batch_rows=3)
  if loss_agg == "token_mean_per_micro":
    with pytest.raises(ValueError, match=r"^loss\.loss_agg_micro_rows: got 3; allowed: "):
      dataclasses.replace(whole, loss=dataclasses.replace(loss_cfg, loss_agg_micro_rows=3))
