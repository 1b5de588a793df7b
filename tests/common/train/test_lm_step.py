"""The pure LM step, in the trainer's own configuration (experiments.train_lm builds the
model, step and optimizer exactly as a run does): loss terms, gradient accumulation,
non-finite handling and what each stabilizer changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import sharding
from common.train import lm_step, train_state
from experiments import train_lm
from experiments.configs import ls_lm


VOCAB = 256


def _config(**overrides):
  c = ls_lm.get_config("test")
  c.update(overrides)
  return c


def _setup(c, with_weights=False):
  mesh = sharding.make_mesh(1, 1)
  mcfg = train_lm.model_config(c, VOCAB)
  tx, sched = train_lm.build_optimizer(c)
  state, state_sh = sharding.create_sharded(train_state.make_init_fn(mcfg, tx, c.seed), mesh)
  gd = train_state.model_graphdef(mcfg)
  keys = ("inputs", "targets") + (("weights",) if with_weights else ())
  bsh = {k: sharding.batch_sharding(mesh, 3, leading=1) for k in keys}
  step = lm_step.jit_train_step(lm_step.make_train_step(gd, tx, sched, train_lm.step_config(c)),
                                state_sh, bsh, mesh)
  return state, step, mesh


def _batch(c, seed=0, accum=None, batch=None):
  a, b = accum or c.grad_accum, batch or c.batch_size
  tok = np.random.default_rng(seed).integers(0, VOCAB, (a, b, c.seq_len + 1)).astype(np.int32)
  return {"inputs": tok[..., :-1], "targets": tok[..., 1:]}


def test_z_loss_term_appears_with_z_loss():
  c = _config(stabilizer="z_loss", z_loss_coef=1e-2, num_layers=1)
  state, step, mesh = _setup(c)
  b = _batch(c)
  # float64 reference of mean(logsumexp(logits)^2) at the step's (initial) parameters.
  gd = train_state.model_graphdef(train_lm.model_config(c, VOCAB))
  forward = jax.jit(lambda p, x: train_state.merge_model(gd, p, {})(x)[0])
  lse = []
  for a in range(c.grad_accum):
    l64 = np.asarray(forward(state.params, b["inputs"][a]), np.float64)
    mx = l64.max(-1, keepdims=True)
    lse.append(mx[..., 0] + np.log(np.exp(l64 - mx).sum(-1)))
  _, m = step(state, sharding.put_batch(b, mesh, leading=1))
  np.testing.assert_allclose(float(m["z_loss"]), np.mean(np.square(lse)), rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + 1e-2 * float(m["z_loss"]),
                             rtol=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
  c2 = _config(attention="mhsa", grad_accum=2, batch_size=4, warmup_steps=0, num_layers=1)
  c1 = _config(attention="mhsa", grad_accum=1, batch_size=8, warmup_steps=0, num_layers=1)
  b2 = _batch(c2, accum=2, batch=4)
  b1 = {k: v.reshape(1, 8, -1) for k, v in b2.items()}
  outs = []
  for c, b in ((c2, b2), (c1, b1)):
    state, step, mesh = _setup(c)
    ms = []
    for _ in range(2):  # the second loss sees the first update
      state, m = step(state, sharding.put_batch(b, mesh, leading=1))
      ms.append([float(m["loss"]), float(m["grad_norm"])])
    outs.append(ms)
  # Same mean gradient (grad_norm) and the same update (next loss). Parameters themselves are
  # not compared: Adam's first step is ~lr * sign(g), ill-conditioned where g ~ 0.
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)
  assert outs[0][1][0] < outs[0][0][0]


def test_nonfinite_loss_never_reaches_params():
  c = _config(inject_nan_at_step=1, num_layers=1)
  state, step, mesh = _setup(c)
  b = sharding.put_batch(_batch(c), mesh, leading=1)
  state, m0 = step(state, b)
  before = jax.device_get((state.params, state.opt_state))
  state, m1 = step(state, b)  # step index 1: NaN loss
  assert bool(m0["finite"]) and not bool(m1["finite"])
  assert np.isnan(float(m1["loss"])) and int(m1["num_nonfinite"]) == 1
  after = jax.device_get((state.params, state.opt_state))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  state, m2 = step(state, b)
  assert bool(m2["finite"]) and int(m2["num_nonfinite"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  assert int(state.step) == 3


def _plant_big_qk(state, factor):
  """Scale every q/k projection so pre-softmax logits grow ~factor^2 (logit growth, planted)."""
  def scale(path, x):
    names = [str(getattr(p, "key", "")) for p in path]
    return x * factor if ("q_proj" in names or "k_proj" in names) else x
  return state.replace(params=jax.tree_util.tree_map_with_path(scale, state.params))


@pytest.mark.parametrize("stabilizer", ["none", "qk_norm", "softcap"])
def test_qk_norm_and_softcap_bound_the_logits(stabilizer):
  c = _config(attention="ls", stabilizer=stabilizer, softcap=3.0)
  state, step, mesh = _setup(c)
  state = _plant_big_qk(state, 30.0)
  _, m = step(state, sharding.put_batch(_batch(c), mesh, leading=1))
  local, glob = np.asarray(m["max_logit_local"]), np.asarray(m["max_logit_global"])
  assert local.shape == glob.shape == (c.num_layers,)
  # QK-norm: |q.k|/sqrt(d) <= ||q|| ||k|| / sqrt(d) = sqrt(d) with unit norm weights.
  bound = {"qk_norm": np.sqrt(c.head_dim) * (1 + 1e-5), "softcap": 3.0 * (1 + 1e-6)}
  if stabilizer == "none":
    assert local.max() > 10.0 and glob.max() > 10.0  # the planted growth is visible
    np.testing.assert_allclose(float(m["loss"]), float(m["ce"]), rtol=1e-7)  # no z-loss term
  else:
    assert 0 < local.max() <= bound[stabilizer] and 0 < glob.max() <= bound[stabilizer]


def test_adagc_clips_a_planted_gradient_spike():
  """After a few real train steps, the trainer's AdaGC optimizer meets a gradient x1e4."""
  c = _config(attention="mhsa", stabilizer="adagc", grad_clip=1.0, adagc_warmup_steps=2,
              adagc_lambda=1.05, num_layers=1)
  state, step, mesh = _setup(c)
  for i in range(4):
    state, _ = step(state, sharding.put_batch(_batch(c, seed=i), mesh, leading=1))
  tx, _ = train_lm.build_optimizer(c)
  gd = train_state.model_graphdef(train_lm.model_config(c, VOCAB))
  micro = {k: v[0] for k, v in _batch(c, seed=9).items()}
  grads = jax.jit(jax.grad(lambda p: lm_step.lm_loss(p, state.model_rest, gd, micro,
                                                     z_loss_coef=0.0)[0]))(state.params)
  nu = lambda s: max(float(jnp.max(x)) for x in jax.tree.leaves(
      optax.tree_utils.tree_get(s, "nu")))
  spike = lambda g: jax.tree.map(lambda x: 1e4 * x, g)
  update = jax.jit(lambda g: tx.update(g, state.opt_state, state.params)[1])
  # Each tensor is clipped to 1.05x its EMA norm: the spike leaves Adam's nu as calm as usual.
  assert nu(update(spike(grads))) < 1.5 * nu(update(grads))
  # The same optimizer without any clipping lets the spike into nu (x1e8).
  c_plain = _config(attention="mhsa", stabilizer="none", grad_clip=0.0, num_layers=1)
  tx_plain, _ = train_lm.build_optimizer(c_plain)
  plain = jax.jit(lambda g: tx_plain.update(g, tx_plain.init(state.params), state.params)[1])
  assert nu(plain(spike(grads))) > 1e6 * nu(plain(grads))
