"""Prompt sharing across a GRPO group (issue 13): each prompt runs once per group in the
rollout's prefill, the scoring and the update, with the values and gradients of the plain
per-row forward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.config import tiny_config
from soft_grpo import algorithm as A
from soft_grpo.rollout import rollout
from test_learner import PROBLEMS, make
from models import randomized_decoder


@pytest.mark.parametrize("attention", ["mhsa", "ls"])
def test_shared_prefix_hidden_equals_the_plain_forward(attention):
  """Left-padded prefixes of different lengths, 3 rows each; LS-attention with a window shorter
  than the prefix (the ring buffer wraps before the suffix starts)."""
  extra = dict(attention="ls", num_local_heads=2, window=5) if attention == "ls" else {}
  import ls_attention  # noqa: F401  (registers "ls")
  model = randomized_decoder(tiny_config(**extra), seed=1)
  rng = np.random.default_rng(0)
  p, g, t, s = 2, 3, 9, 6
  prefix = rng.integers(1, 256, (p, t)).astype(np.int32)
  start = np.array([0, 4], np.int32)                 # row 1 is left-padded by 4
  suffix = rng.integers(1, 256, (p * g, s)).astype(np.int32)
  rows = np.concatenate([np.repeat(prefix, g, axis=0), suffix], axis=1)
  want, _ = model(jnp.asarray(rows), start_B=jnp.asarray(np.repeat(start, g)),
                  return_hidden=True)
  got = model.shared_prefix_hidden(jnp.asarray(prefix), jnp.asarray(suffix),
                                   start_P=jnp.asarray(start), rows_per_prefix=g)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want)[:, t:], atol=2e-5, rtol=2e-5)
  # Embedding inputs (the soft modes feed mixtures) take the same path.
  emb = model.embed(jnp.asarray(prefix)), model.embed(jnp.asarray(suffix))
  got_e = model.shared_prefix_hidden(*emb, start_P=jnp.asarray(start), rows_per_prefix=g)
  np.testing.assert_allclose(np.asarray(got_e), np.asarray(got), atol=1e-6)
  with pytest.raises(ValueError, match=r"^shared_prefix_hidden: 5 suffix rows for 2 prefixes"):
    model.shared_prefix_hidden(jnp.asarray(prefix), jnp.asarray(suffix[:5]),
                               start_P=jnp.asarray(start), rows_per_prefix=g)


@pytest.mark.parametrize("mode", ["discrete", "soft_gumbel"])
def test_shared_scoring_and_gradients_equal_per_row(mode):
  # noise_factor 0.5: the stored Gumbel noise is clipped to [-1.5, 3] when sampled, so at
  # noise 1 some slots score exactly on the clip edge, where the gradient (0 or not) is decided
  # by rounding; at 0.5 every slot is inside and the gradient is a smooth function.
  tr, params = make(mode, noise_factor=0.5)
  assert tr.rows_per_prompt == 4                     # group_size 4, sharing on by default
  problems = [PROBLEMS[1], PROBLEMS[14]]
  out, _, _ = tr.generate(params, problems, 4, jax.random.key(5))
  rc = tr.cfg.rollout
  score = jax.jit(A.score_actions, static_argnums=(0, 3), static_argnames=("rows_per_prompt",))
  plain = np.asarray(score(tr.graphdef, params, out, rc))
  shared = np.asarray(score(tr.graphdef, params, out, rc, rows_per_prompt=4))
  mask = np.asarray(out.action_mask_BxN)
  assert mask.sum() > 10
  np.testing.assert_allclose(shared[mask], plain[mask], atol=2e-5, rtol=1e-5)
  # Chunked scoring: 2 chunks of rows j, j+2, ... keep runs of 2 rows per prompt.
  chunked = jax.jit(A.score_in_chunks, static_argnums=(0, 3, 4),
                    static_argnames=("rows_per_prompt",))(tr.graphdef, params, out, rc, 2,
                                                          rows_per_prompt=4)
  np.testing.assert_allclose(np.asarray(chunked)[mask], plain[mask], atol=2e-5, rtol=1e-5)
  rng = np.random.RandomState(0)
  batch = {"rollout": out, "advantages_B": jnp.asarray(rng.randn(8), jnp.float32),
           "old_logp_BxN": jnp.asarray(plain + 0.05 * rng.randn(*plain.shape), jnp.float32),
           "ref_logp_BxN": jnp.asarray(plain)}
  grad = jax.jit(jax.grad(A.grpo_objective, has_aux=True), static_argnums=(1, 3, 4))
  g1, m1 = grad(params, tr.graphdef, batch, tr.cfg, 1)
  g4, m4 = grad(params, tr.graphdef, batch, tr.cfg, 4)
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(
        1.0, float(np.abs(np.asarray(b)).max())), rtol=1e-3)


def test_micro_batches_keep_runs_of_one_prompt():
  """`micro_rows_per_prompt` says what `split_micro` really does to prompt-major groups."""
  for g in (2, 3, 4, 8):
    for groups in (1, 2, 4):
      prompt_of_row = jnp.arange(g * groups) // g
      for m in (1, 2, 3, 4, 8):
        if (g * groups) % m:
          continue
        r = A.micro_rows_per_prompt(g, m)
        micro = np.asarray(A.split_micro(prompt_of_row, m))     # [m, rows/m]
        runs = micro.reshape(m, -1, r)
        assert (runs == runs[:, :, :1]).all(), (g, groups, m, r)


def test_micro_batched_update_with_shared_prompts_equals_per_row():
  tr, params = make("soft_gumbel", noise_factor=0.5)   # see the test above
  cfg = dataclasses.replace(tr.cfg, grpo=dataclasses.replace(tr.cfg.grpo, micro_batch_rows=4),
                            optim=dataclasses.replace(tr.cfg.optim, eps=1.0))
  out, _, _ = tr.generate(params, PROBLEMS[3:5], 4, jax.random.key(2))
  rng = np.random.RandomState(1)
  lp = A.score_actions(tr.graphdef, params, out, cfg.rollout)
  batch = {"rollout": out, "advantages_B": jnp.asarray(rng.randn(8), jnp.float32),
           "ref_logp_BxN": lp}
  state = A.init_state(params, cfg)
  upd = lambda g: jax.jit(functools.partial(A.update_step, graphdef=tr.graphdef, cfg=cfg,
                                            rows_per_prompt=g))(state, batch)
  (s1, m1), (s4, m4) = upd(1), upd(4)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("mode", ["discrete", "soft_gumbel"])
def test_rollout_with_shared_prefill_equals_per_row_prefill(mode):
  tr, params = make(mode)
  rows = [tr.prompt_ids(p["problem"]) for p in (PROBLEMS[2], PROBLEMS[9]) for _ in range(4)]
  from common.sampler import left_pad
  tokens, start = left_pad(rows, tr.cfg.rollout.pad_id, multiple=8)
  key = jax.random.key(7)
  a = rollout(tr.graphdef, params, tokens, start, tr.cfg.rollout, key)
  b = rollout(tr.graphdef, params, tokens, start, tr.cfg.rollout, key, rows_per_prompt=4)
  np.testing.assert_array_equal(np.asarray(b.tokens_BxN), np.asarray(a.tokens_BxN))
  np.testing.assert_array_equal(np.asarray(b.segment_BxN), np.asarray(a.segment_BxN))
  np.testing.assert_allclose(np.asarray(b.y_BxNxK), np.asarray(a.y_BxNxK), atol=1e-4)
  with pytest.raises(ValueError, match=r"^rollout: rows_per_prompt 3 does not divide the 8"):
    rollout(tr.graphdef, params, tokens, start, tr.cfg.rollout, key, rows_per_prompt=3)


def test_sharing_can_be_turned_off_and_scoring_keeps_remat_and_ls_kernels():
  tr, _ = make("discrete")
  off = dataclasses.replace(tr.cfg, grpo=dataclasses.replace(tr.cfg.grpo,
                                                             share_prompt_prefix=False))
  from soft_grpo.learner import Learner
  assert Learner(tr.graphdef, off, tr.tokenizer, PROBLEMS, tr.reward_fn,
                 mesh=tr.mesh).rows_per_prompt == 1
  assert A.shared_prompt_forward_applies(tiny_config())
  assert not A.shared_prompt_forward_applies(tiny_config(remat="full"))
  assert not A.shared_prompt_forward_applies(
      tiny_config(attention="ls", num_local_heads=2, window=4))
  with pytest.raises(ValueError, match=r"^grpo\.share_prompt_prefix: got 'yes'"):
    dataclasses.replace(tr.cfg.grpo, share_prompt_prefix="yes")
