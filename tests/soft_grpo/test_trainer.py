"""GRPO / SofT-GRPO trainer on a tiny random model: end to end, resume, 8-device sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from common.config import tiny_config
from common.model import Decoder
from common.train.checkpoint import Checkpointer, abstract_like
from soft_grpo.rollout import RolloutConfig
from soft_grpo.trainer import (ByteTokenizer, GRPOConfig, Trainer, init_state,
                               problems_for_step, think_end_ids)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBLEMS = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(4) for b in range(4)]


def reward_fn(texts, golds):
  # A dense toy reward (share of digits in the response) so groups have non-zero advantages.
  return np.array([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts],
                  np.float32), {"n": len(texts)}


def make(mode, mesh=None, lr=1e-3, noise_factor=1.0):
  tok = ByteTokenizer()
  model = Decoder(tiny_config(vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rc = RolloutConfig(mode=mode, max_new_tokens=12, think_budget=3, top_k=4,
                     noise_factor=noise_factor,
                     think_end_ids=think_end_ids(tok), eos_ids=tok.eos_ids)
  cfg = GRPOConfig(rollout=rc, group_size=4, prompts_per_step=4, mini_batch_prompts=2,
                   max_prompt_len=8, learning_rate=lr)
  tr = Trainer(graphdef, cfg, tok, PROBLEMS, reward_fn, mesh=mesh,
               prompt_fn=lambda t, p: t.encode(p + "="))
  return tr, nnx.to_pure_dict(state)


@pytest.mark.parametrize("mode", ["soft_gumbel", "discrete"])
def test_training_steps_change_params_and_report_metrics(mode, tmp_path):
  tr, params = make(mode)
  state = tr.place_state(init_state(params, tr.cfg))
  p0 = jax.tree.map(np.asarray, state.params)
  history = []
  for _ in range(2):
    state, m = tr.train_step(state)
    history.append(m)
  assert int(state.step) == 2
  delta = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, p0)))
  assert delta > 1e-5
  ref_delta = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.ref_params, p0)))
  assert ref_delta == 0.0                       # the reference stays frozen
  for m in history:
    for key in ("reward_mean", "accuracy", "response_length", "think_length",
                "clip_fraction", "kl", "grad_norm", "tokens_per_s"):
      assert np.isfinite(m[key]), key
    assert 0 < m["response_length"] <= 12 and m["think_length"] <= 3 + 8   # budget + "</think>"
    assert m["grad_norm"] > 0
  assert history[0]["data_position"] == 4 and history[1]["data_position"] == 8
  # Second step: the policy moved away from the reference, so the k3 KL is positive.
  assert history[1]["kl"] > 0

  # Resume: checkpoint after step 2, run step 3 twice (continued and restored): identical.
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(2, state, extras={"data_position": 8})
  cont, m_cont = tr.train_step(jax.tree.map(lambda x: x.copy(), state))
  tr2, params2 = make(mode)
  fresh = tr2.place_state(init_state(params2, tr2.cfg))
  step, restored, extras = ckpt.restore_latest(abstract_like(fresh))
  assert step == 2 and extras["data_position"] == 8
  again, m_again = tr2.train_step(restored)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(cont.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("reward_mean", "kl", "grad_norm", "response_length"):
    assert m_cont[key] == m_again[key], key


def test_data_order_is_a_function_of_step():
  a = problems_for_step(10, 3, 4, seed=1)
  assert a == problems_for_step(10, 3, 4, seed=1)
  seen = [i for s in range(5) for i in problems_for_step(10, s, 4, seed=1)]
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_grpo_config_errors():
  rc = RolloutConfig(think_end_ids=(1,))
  with pytest.raises(ValueError, match="config.mini_batch_prompts"):
    GRPOConfig(rollout=rc, prompts_per_step=64, mini_batch_prompts=24)
  with pytest.raises(ValueError, match="config.group_size"):
    GRPOConfig(rollout=rc, group_size=1)
  with pytest.raises(ValueError, match="config.grad_clip"):
    GRPOConfig(rollout=rc, grad_clip=0.0)


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
    import jax, numpy as np
    from jax.sharding import Mesh
    from test_trainer import make
    from soft_grpo.trainer import init_state
    assert jax.device_count() == 8
    results = []
    for mesh in (Mesh(np.array(jax.devices()[:1]), ("data",)),
                 Mesh(np.array(jax.devices()), ("data",)),
                 Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))):
      # Adam turns float-noise-sized gradients into +-lr steps, so a small lr bounds the
      # parameter difference that reduction order alone can cause.
      # noise_factor 0.5 keeps g' = y' - lp off the clip edges [-1.5, 3]: at an edge, float
      # rounding (which differs with the reduction order) decides whether gradient flows.
      tr, params = make("soft_gumbel", mesh=mesh, lr=1e-6, noise_factor=0.5)
      state = tr.place_state(init_state(params, tr.cfg))
      for _ in range(2):
        state, m = tr.train_step(state)
      results.append((jax.tree.map(np.asarray, state.params), m))
    (p1, m1) = results[0]
    for p8, m8 in results[1:]:   # data-parallel 8, and data 4 x fsdp 2
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=0)
      for k in ("reward_mean", "response_length", "think_length"):
        assert m1[k] == m8[k], (k, m1[k], m8[k])
      np.testing.assert_allclose(m1["kl"], m8["kl"], rtol=1e-3, atol=1e-7)
      for k in ("grad_norm", "loss", "pg_loss"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-7, err_msg=k)
    print("SHARDED_OK", m1["reward_mean"], m1["kl"])
""")


def test_sharded_training_on_8_devices_equals_1_device():
  """Data-parallel over 8 simulated devices, and data x FSDP (4 x 2), match 1 device."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARDED.format(root=ROOT, here=here)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("loss_agg", ["token_mean", "token_mean_per_micro"])
def test_micro_batches_accumulate_gradients_and_chunk_scoring(loss_agg):
  """Memory micro-batches (rows j, j+4, ...) only bound memory: the accumulated gradient is
  the gradient of the whole mini-batch's loss under `loss_agg` (issue 11 item 4)."""
  import dataclasses
  import functools
  import jax.numpy as jnp
  from soft_grpo import trainer as T
  tr, params = make("soft_gumbel")
  loss_cfg = dataclasses.replace(tr.cfg.loss, loss_agg=loss_agg, loss_agg_micro_rows=2)
  # adam_eps = 1: the first AdamW step is ~ -lr * g (linear in g) instead of -lr * sign(g), so
  # comparing parameters compares gradients, their scale included.
  whole = dataclasses.replace(tr.cfg, loss=loss_cfg, adam_eps=1.0)
  cfg = dataclasses.replace(whole, micro_batch_rows=2)     # 8 rows/update -> 4 micro-batches
  out, _, _ = tr.generate(params, [0, 1], 4, jax.random.key(3))
  rc = cfg.rollout
  full = jax.jit(T.score_actions, static_argnums=(0, 3))(tr.graphdef, params, out, rc)
  chunked = jax.jit(T.score_in_chunks, static_argnums=(0, 3, 4))(tr.graphdef, params, out, rc, 4)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5)
  rng = np.random.RandomState(0)
  batch = {"rollout": out, "advantages_B": jnp.asarray(rng.randn(8), jnp.float32),
           "old_logp_BxN": full + 0.05 * jnp.asarray(rng.randn(*full.shape), jnp.float32),
           "ref_logp_BxN": full}
  state = T.init_state(params, cfg)
  new, metrics = jax.jit(functools.partial(T.update_step, graphdef=tr.graphdef, cfg=cfg))(
      state, batch)
  # Reference: the gradient of the whole mini-batch's loss (its own weights), one AdamW step.
  grad = jax.jit(jax.grad(T.grpo_objective, has_aux=True), static_argnums=(1, 3))
  g, m_whole = grad(params, tr.graphdef, batch, whole)
  upd, _ = T.make_optimizer(cfg).update(g, state.opt_state, state.params)
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
  with pytest.raises(ValueError, match="config.micro_batch_rows"):
    dataclasses.replace(tr.cfg, micro_batch_rows=3)
  if loss_agg == "token_mean_per_micro":
    with pytest.raises(ValueError, match="config.loss_agg_micro_rows"):
      dataclasses.replace(whole, loss=dataclasses.replace(loss_cfg, loss_agg_micro_rows=3))


def test_evaluate_samples_soft_modes_at_eval_tau():
  """Issue 11 item 3: evaluation uses tau = eval_tau (0.5, official inference), not the
  training tau (0.1)."""
  import dataclasses
  tr, params = make("soft_gumbel")
  assert tr.cfg.eval_tau == 0.5 and tr.cfg.rollout.tau == 0.1
  key = jax.random.key(5)
  got = tr.evaluate(params, [0, 1], 4, key, rows_per_call=8)
  sub = jax.random.split(key)[1]
  texts = {}
  for tau in (0.5, 0.1):
    rc = dataclasses.replace(tr.cfg.rollout, tau=tau)
    out, full, _ = tr.generate(params, [0, 1], 4, sub, rcfg=rc)
    texts[tau] = (full, np.asarray(out.y_BxNxK))
    if tau == 0.5:
      np.testing.assert_array_equal(got, tr.rewards([0, 1], full, 4)[0].reshape(2, 4))
  # tau changes the fed mixtures, hence the trajectories.
  assert texts[0.5][0] != texts[0.1][0] or not np.array_equal(texts[0.5][1], texts[0.1][1])
  with pytest.raises(ValueError, match="config.eval_tau"):
    dataclasses.replace(tr.cfg, eval_tau=0.0)
