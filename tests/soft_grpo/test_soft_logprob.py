"""gumbel_soft_logprob against a float64 NumPy transcription; action_logprobs routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_grpo
from soft_grpo import logprob as lp_lib
from soft_grpo import modes
from soft_grpo import soft_token as st


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def np_gumbel_soft_logprob(logits, ids, y, temperature=1.0):
  """Float64 transcription of issue #5 / official logprobs_from_logits_topk_gumbel.

  Slots with y' = -inf (removed by top-p) take no part in p^ nor in the mask (issue 11): the
  official sampler stores a zero-probability id there, so its p^ is over the kept slots.
  """
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  pk = np.take_along_axis(p, ids, -1)
  y = y.astype(np.float64)
  finite = np.isfinite(y)
  kept = finite | ~finite.any(-1, keepdims=True)
  pk = np.where(kept, pk, 0.0)
  p_hat = pk / pk.sum(-1, keepdims=True)
  lp = np.log(p_hat + 1e-6)
  with np.errstate(invalid="ignore"):
    g = np.clip(np.where(finite, y, 0.0) - lp, -1.5, 3.0)
  m = ((lp > -3) & finite).astype(np.float64)
  return (m * (-g - np.exp(-g))).sum(-1) / np.maximum(m.sum(-1), 1.0)


def _random_case(rng, shape=(3, 7), v=50, k=5, spread=3.0):
  logits = (rng.normal(size=shape + (v,)) * spread).astype(np.float32)
  ids = np.stack([rng.choice(v, size=k, replace=False) for _ in range(np.prod(shape))])
  ids = ids.reshape(shape + (k,)).astype(np.int32)
  z = np.take_along_axis(logits.astype(np.float64), ids, -1)
  p_hat = np.exp(z - z.max(-1, keepdims=True))
  p_hat /= p_hat.sum(-1, keepdims=True)
  # y' = log(p^ + 1e-6) + g with g spanning and exceeding the clip range.
  g = rng.uniform(-3.0, 5.0, size=ids.shape)
  y = (np.log(p_hat + 1e-6) + g).astype(np.float32)
  return logits, ids, y


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_float64_reference_on_random_inputs(jit, temperature):
  rng = np.random.default_rng(0)
  logits, ids, y = _random_case(rng)
  # Sprinkle -inf slots (top-p removed) and one row with everything masked.
  y[0, 0, 3:] = -np.inf
  y[1, 2, :] = -np.inf
  f = jax.jit(soft_grpo.gumbel_soft_logprob) if jit else soft_grpo.gumbel_soft_logprob
  got = np.asarray(f(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(y),
                     temperature=temperature))
  want = np_gumbel_soft_logprob(logits, ids, y, temperature)
  assert got.shape == (3, 7) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert got[1, 2] == 0.0  # sum(m) = 0 -> 0 / max(0, 1)


def test_mask_and_clip_edges():
  """Hand-built rows that sit on each branch of the formula."""
  v = 8
  # p^ over ids [0, 1, 2, 3] = [0.9, 0.0999, 1e-4, ~0]: lp > -3 for the first two only.
  probs = np.array([0.9, 0.0999, 1e-4, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9])
  logits = np.log(probs).astype(np.float32)[None]
  ids = np.array([[0, 1, 2, 3]], np.int32)
  lp = np.log(probs[:4] / probs[:4].sum() + 1e-6)
  cases = {
      "inside": lp + np.array([0.3, -0.7, 0.0, 0.0]),
      "clip_high": lp + np.array([3.5, 10.0, 0.0, 0.0]),      # g' = 3
      "clip_low": lp + np.array([-1.6, -50.0, 0.0, 0.0]),     # g' = -1.5
      "masked_only_vary": lp + np.array([0.3, -0.7, 2.0, -1.0]),
  }
  for name, y in cases.items():
    got = float(soft_grpo.gumbel_soft_logprob(jnp.asarray(logits), jnp.asarray(ids),
                                              jnp.asarray(y[None].astype(np.float32)))[0])
    want = float(np_gumbel_soft_logprob(logits, ids, y[None].astype(np.float32))[0])
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
  # Entries with lp <= -3 do not change the value.
  a = soft_grpo.gumbel_soft_logprob(jnp.asarray(logits), jnp.asarray(ids),
                                    jnp.asarray(cases["inside"][None].astype(np.float32)))
  b = soft_grpo.gumbel_soft_logprob(jnp.asarray(logits), jnp.asarray(ids),
                                    jnp.asarray(cases["masked_only_vary"][None].astype(np.float32)))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Clip high: both live slots at g' = 3 -> -3 - exp(-3).
  got = float(soft_grpo.gumbel_soft_logprob(
      jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(cases["clip_high"][None].astype(np.float32)))[0])
  np.testing.assert_allclose(got, -3 - np.exp(-3), atol=1e-5)
  # Clip low: g' = -1.5 -> 1.5 - exp(1.5).
  got = float(soft_grpo.gumbel_soft_logprob(
      jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(cases["clip_low"][None].astype(np.float32)))[0])
  np.testing.assert_allclose(got, 1.5 - np.exp(1.5), atol=1e-5)


def test_mean_not_sum_over_mask():
  logits = jnp.zeros((1, 6))  # uniform: every p^ = 1/4, lp = log(0.25) > -3
  ids = jnp.asarray([[0, 1, 2, 3]])
  y = jnp.full((1, 4), np.log(0.25 + 1e-6), jnp.float32)  # g' = 0 everywhere
  np.testing.assert_allclose(np.asarray(soft_grpo.gumbel_soft_logprob(logits, ids, y)), [-1.0],
                             atol=1e-6)


def test_gradients_finite_nonzero_and_match_finite_differences():
  rng = np.random.default_rng(1)
  logits, ids, y = _random_case(rng, shape=(4,), v=12, k=4, spread=1.0)
  # Keep g inside the clip range so the gradient is not clipped away.
  z = np.take_along_axis(logits.astype(np.float64), ids, -1)
  p_hat = np.exp(z - z.max(-1, keepdims=True))
  p_hat /= p_hat.sum(-1, keepdims=True)
  y = (np.log(p_hat + 1e-6) + rng.uniform(-1.0, 2.0, size=ids.shape)).astype(np.float32)
  y[0, -1] = -np.inf
  fn = lambda l: jnp.sum(soft_grpo.gumbel_soft_logprob(l, jnp.asarray(ids), jnp.asarray(y),
                                                       temperature=0.8))
  grad = np.asarray(jax.grad(fn)(jnp.asarray(logits)))
  assert np.isfinite(grad).all()
  assert np.abs(grad).max() > 1e-3
  # Central differences on the float64 reference.
  eps = 1e-5
  for row, col in [(0, ids[0, 0]), (1, ids[1, 1]), (2, ids[2, 2]), (3, 0)]:
    up, down = logits.astype(np.float64).copy(), logits.astype(np.float64).copy()
    up[row, col] += eps
    down[row, col] -= eps
    fd = (np_gumbel_soft_logprob(up, ids, y, 0.8).sum()
          - np_gumbel_soft_logprob(down, ids, y, 0.8).sum()) / (2 * eps)
    np.testing.assert_allclose(grad[row, col], fd, atol=2e-3, rtol=2e-3)


def test_no_nan_gradient_with_neg_inf_and_underflowing_logits():
  logits = jnp.asarray([[50.0, -50.0, -60.0, -70.0, 0.0, 0.0]])
  ids = jnp.asarray([[1, 2, 3, 5]])  # none of them is the argmax of the full vocab
  y = jnp.asarray([[0.0, -1.0, -jnp.inf, -jnp.inf]])
  val, grad = jax.value_and_grad(lambda l: soft_grpo.gumbel_soft_logprob(l, ids, y).sum())(logits)
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


def test_action_logprobs_routes_soft_and_discrete_positions():
  rng = np.random.default_rng(2)
  b, t, v, k = 2, 6, 30, 4
  logits = jnp.asarray(rng.normal(size=(b, t + 1, v)).astype(np.float32) * 2)
  soft_ids = jnp.asarray(rng.integers(1, v, size=(b, t + 1, k)), jnp.int32)
  soft_y = jnp.asarray(rng.normal(size=(b, t + 1, k)).astype(np.float32) - 2)
  tok = jnp.asarray(rng.integers(1, v, size=(b, t + 1)), jnp.int32)
  d_ids, d_y = st.one_hot_action(tok, k)
  is_soft = jnp.asarray(rng.random((b, t + 1)) < 0.5)
  ids = jnp.where(is_soft[..., None], soft_ids, d_ids)
  y = jnp.where(is_soft[..., None], soft_y, d_y)
  # One-step alignment: logits at t score the action stored at t + 1.
  got = modes.action_logprobs(logits[:, :-1], ids[:, 1:], y[:, 1:], temperature=0.7)
  soft_ref = np_gumbel_soft_logprob(np.asarray(logits[:, :-1]), np.asarray(ids[:, 1:]),
                                    np.asarray(y[:, 1:]), 0.7)
  z = np.asarray(logits[:, :-1], np.float64) / 0.7
  logsm = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  disc_ref = np.take_along_axis(logsm, np.asarray(tok[:, 1:])[..., None], -1)[..., 0]
  want = np.where(np.asarray(is_soft[:, 1:]), soft_ref, disc_ref)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda l: modes.action_logprobs(l, ids[:, 1:], y[:, 1:]).sum()))(
      logits[:, :-1])
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
  # Discrete mode scores every position as a token.
  got_d = modes.action_logprobs(logits[:, :-1], ids[:, 1:], y[:, 1:], temperature=0.7,
                                 mode="discrete")
  np.testing.assert_allclose(
      np.asarray(got_d),
      np.take_along_axis(logsm, np.asarray(ids[:, 1:, 0])[..., None], -1)[..., 0], rtol=1e-5,
      atol=1e-5)
  with pytest.raises(ValueError, match="mode"):
    modes.action_logprobs(logits[:, :-1], ids[:, 1:], y[:, 1:], mode="nope")
  with pytest.raises(ValueError, match="shapes"):
    modes.action_logprobs(logits, ids[:, 1:], y[:, 1:])


def test_rollout_step_is_consistent_with_logprob_at_old_policy():
  """At the sampling policy, soft_gumbel's y' - lp is the stored (clamped) noise."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(64, 40)).astype(np.float32) * 2)
  emb = jnp.asarray(rng.normal(size=(40, 4)).astype(np.float32))
  out = jax.jit(modes.soft_thinking_step, static_argnames=("mode", "top_k"))(
      jax.random.key(0), logits, emb, mode="soft_gumbel", top_k=5, top_p=1.0, tau=0.1)
  lp = soft_grpo.gumbel_soft_logprob(logits, out.ids_BxK, out.y_prime_BxK)
  # With top_p=1 the rollout's p~ equals p^, so g' equals the drawn clamped noise.
  z = jnp.take_along_axis(logits, out.ids_BxK, -1)
  g = out.y_prime_BxK - jnp.log(jax.nn.softmax(z, -1) + 1e-6)
  m = jnp.log(jax.nn.softmax(z, -1) + 1e-6) > -3
  want = jnp.sum(jnp.where(m, -g - jnp.exp(-g), 0), -1) / jnp.maximum(m.sum(-1), 1)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("mode", ["soft_dirichlet", "soft_gaussian"])
def test_ablation_logprobs_finite_with_gradients(mode):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(16, 20)).astype(np.float32))
  emb = jnp.asarray(rng.normal(size=(20, 4)).astype(np.float32))
  out = jax.jit(modes.soft_thinking_step, static_argnames=("mode", "top_k"))(
      jax.random.key(1), logits, emb, mode=mode, top_k=4, top_p=0.9)
  fn = modes.MODES[mode].logprob
  val, grad = jax.jit(jax.value_and_grad(lambda l: fn(l, out.ids_BxK, out.y_prime_BxK).sum()))(
      logits)
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()
  assert np.abs(np.asarray(grad)).max() > 0


def _removed_slot_case(rng, rows=16, v=40, k=5):
  """Rows whose slots 2.. (or 3..) were removed by top-p but keep real, probable ids."""
  logits = rng.normal(size=(rows, v)).astype(np.float32)
  ids = np.stack([rng.choice(v, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
  # The removed runner-ups still have real probability under the current policy.
  np.put_along_axis(logits, ids, np.take_along_axis(logits, ids, -1) + 3.0, -1)
  y = rng.normal(size=(rows, k)).astype(np.float32) - 1.0
  n_kept = np.where(np.arange(rows) % 2 == 0, 2, 3)
  removed = np.arange(k)[None] >= n_kept[:, None]
  y[removed] = -np.inf
  return logits, ids, y, removed


@pytest.mark.parametrize("mode", ["soft_gumbel", "soft_dirichlet", "soft_gaussian"])
def test_top_p_removed_slots_take_no_part_in_p_hat(mode):
  """Issue 11 item 1: the value equals the density with p^ renormalised over the kept slots.

  Equivalent statement (the official sampler's storage): replacing the removed slots' ids by
  ids of (numerically) zero probability leaves the log-prob unchanged, and the logits of the
  removed ids get exactly zero gradient.
  """
  rng = np.random.default_rng(11)
  logits, ids, y, removed = _removed_slot_case(rng)
  if mode == "soft_dirichlet":
    y = np.where(removed, -np.inf, rng.normal(size=y.shape) - 2.0).astype(np.float32)
  elif mode == "soft_gaussian":
    y = np.where(removed, -np.inf, rng.uniform(0.1, 0.6, size=y.shape)).astype(np.float32)
  fn = modes.MODES[mode].logprob
  got = np.asarray(fn(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(y), temperature=0.7))
  # Official storage: a zero-probability id (logit -1e4) in every removed slot.
  zero_id = logits.shape[-1]
  logits_off = np.concatenate([logits, np.full((logits.shape[0], 1), -1e4, np.float32)], -1)
  ids_off = np.where(removed, zero_id, ids).astype(np.int32)
  want = np.asarray(fn(jnp.asarray(logits_off), jnp.asarray(ids_off), jnp.asarray(y),
                       temperature=0.7))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if mode == "soft_gumbel":
    np.testing.assert_allclose(got, np_gumbel_soft_logprob(logits, ids, y, 0.7), rtol=1e-5,
                               atol=1e-5)
  grad = np.asarray(jax.grad(lambda l: fn(l, jnp.asarray(ids), jnp.asarray(y),
                                          temperature=0.7).sum())(jnp.asarray(logits)))
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(np.take_along_axis(grad, ids, -1)[removed], 0.0)
  assert np.abs(np.take_along_axis(grad, ids, -1)[~removed]).max() > 1e-4
