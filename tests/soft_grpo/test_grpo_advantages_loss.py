"""Group advantages and the clipped GRPO loss against hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soft_grpo
from soft_grpo import loss as loss_lib


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


# ------------------------------------------------------------------ advantages


def test_group_advantages_hand_computed():
  r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
  adv = np.asarray(soft_grpo.group_advantages(r, 4))
  # Group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
  np.testing.assert_allclose(adv[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6),
                             rtol=1e-6)
  # Group 2: all equal -> 0 (not NaN).
  np.testing.assert_array_equal(adv[4:8], 0.0)
  # Group 3: mean 0.5, std sqrt(4 * 0.25 / 3).
  np.testing.assert_allclose(adv[8:], np.array([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-6),
                             rtol=1e-6)


def test_group_advantages_random_vs_numpy_and_jit():
  rng = np.random.default_rng(0)
  r = rng.normal(size=64).astype(np.float32)
  want = r.reshape(8, 8)
  want = ((want - want.mean(1, keepdims=True)) / (want.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()
  got = jax.jit(soft_grpo.group_advantages, static_argnums=1)(jnp.asarray(r), 8)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  tok = soft_grpo.broadcast_to_tokens(got, jnp.asarray(rng.random((64, 5)) < 0.5))
  assert tok.shape == (64, 5)


@pytest.mark.parametrize("rewards, group_size, match", [
    ([1.0, 0.0], 1, "group_size"),
    ([1.0, 0.0], 0, "group_size"),
    ([1.0, 0.0, 1.0], 2, "group_size"),
    ([1.0, 0.0], 2.0, "group_size"),
    ([[1.0, 0.0]], 2, "rewards"),
])
def test_group_advantages_validation(rewards, group_size, match):
  with pytest.raises(ValueError, match=match):
    soft_grpo.group_advantages(rewards, group_size)


# ------------------------------------------------------------------ PPO loss

# Tokens: (advantage, ratio, expected per-token loss, counts as clipped, dual-clipped)
_CASES = [
    (+1.0, 1.5, -1.2, True, False),    # ratio clipped to 1 + 0.2
    (+1.0, 0.5, -0.5, False, False),   # unclipped (min of surrogate)
    (-1.0, 1.5, 1.5, False, False),    # unclipped, below the dual clip 3
    (-1.0, 5.0, 3.0, False, True),     # dual clip: -A * c
    (-1.0, 0.5, 0.8, True, False),     # ratio clipped to 1 - 0.2
    (+2.0, 1.1, -2.2, False, False),   # inside the trust region
]


def _case_arrays():
  adv = np.array([c[0] for c in _CASES], np.float32)[None]
  ratio = np.array([c[1] for c in _CASES], np.float32)[None]
  old = np.full_like(ratio, -1.3)
  new = old + np.log(ratio)
  return jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv)


def test_ppo_dual_clip_hand_computed():
  new, old, adv = _case_arrays()
  mask = jnp.ones_like(adv)
  loss, m = loss_lib.ppo_dual_clip_loss(new, old, adv, mask)
  per_tok = np.array([c[2] for c in _CASES])
  np.testing.assert_allclose(float(loss), per_tok.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["clip_fraction"]), np.mean([c[3] for c in _CASES]), rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_fraction_lower"]), np.mean([c[4] for c in _CASES]),
                             rtol=1e-6)
  # Token mean over the mask only.
  mask2 = jnp.asarray([[1, 1, 0, 1, 0, 0]], jnp.float32)
  loss2, _ = loss_lib.ppo_dual_clip_loss(new, old, adv, mask2)
  np.testing.assert_allclose(float(loss2), per_tok[[0, 1, 3]].mean(), rtol=1e-5)
  # Plain PPO clip has no dual clip: the ratio-5 token costs 5.
  loss3, _ = loss_lib.ppo_clip_loss(new, old, adv, mask)
  per_tok3 = per_tok.copy()
  per_tok3[3] = 5.0
  np.testing.assert_allclose(float(loss3), per_tok3.mean(), rtol=1e-5)


def test_ppo_gradients_vanish_exactly_on_clipped_tokens():
  new, old, adv = _case_arrays()
  mask = jnp.ones_like(adv)
  grad = np.asarray(jax.grad(lambda n: loss_lib.ppo_dual_clip_loss(n, old, adv, mask)[0])(new))[0]
  ratio = np.array([c[1] for c in _CASES])
  a = np.array([c[0] for c in _CASES])
  n = len(_CASES)
  # d(-A * r)/d logp = -A * r for active tokens; 0 where clipped or dual-clipped.
  want = np.where([c[3] or c[4] for c in _CASES], 0.0, -a * ratio / n)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_k3_kl_hand_computed_and_clamped():
  logp = jnp.asarray([[0.0, 0.0, 0.0, -1.0]])
  ref = jnp.asarray([[0.0, math.log(2.0), 5.0, -1.0 - math.log(2.0)]])
  kl = np.asarray(loss_lib.k3_kl(logp, ref))[0]
  np.testing.assert_allclose(kl, [0.0, 2.0 - math.log(2.0) - 1.0, 10.0, 0.5 + math.log(2.0) - 1.0],
                             rtol=1e-6, atol=1e-7)


def test_grpo_loss_combines_terms():
  rng = np.random.default_rng(1)
  b, t = 4, 6
  logp = jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.1 - 1)
  old = logp + jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.05)
  ref = logp + jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.2)
  adv = jnp.asarray(np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32))
  mask = jnp.asarray(rng.random((b, t)) < 0.7)
  ent = jnp.asarray(rng.random((b, t)).astype(np.float32))
  cfg = loss_lib.LossConfig(kl_coef=0.001, entropy_coef=0.01)
  loss, m = loss_lib.grpo_loss(logp, old, ref, adv, mask, config=cfg, entropy_BxT=ent)
  pg, _ = loss_lib.ppo_dual_clip_loss(logp, old, adv, mask)
  kl = loss_lib.masked_token_mean(loss_lib.k3_kl(logp, ref), mask)
  e = loss_lib.masked_token_mean(ent, mask)
  np.testing.assert_allclose(float(loss), float(pg + 0.001 * kl - 0.01 * e), rtol=1e-6)
  for key in ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "ppo_kl"):
    assert key in m and np.isfinite(float(m[key]))
  # Defaults: entropy coefficient 0, KL 0.001, clip 0.2, dual clip 3.
  d = loss_lib.LossConfig()
  assert (d.clip_ratio_low, d.clip_ratio_high, d.clip_ratio_c, d.kl_coef, d.entropy_coef) == (
      0.2, 0.2, 3.0, 0.001, 0.0)
  with pytest.raises(ValueError, match="ref_logp"):
    loss_lib.grpo_loss(logp, old, None, adv, mask)
  # Jits, and old / ref log-probs receive no gradient.
  g_old, g_ref = jax.grad(lambda o, r: jax.jit(
      lambda *a: loss_lib.grpo_loss(*a)[0])(logp, o, r, adv, mask), argnums=(0, 1))(old, ref)
  assert not np.asarray(g_old).any() and not np.asarray(g_ref).any()


@pytest.mark.parametrize("kwargs, field", [
    (dict(policy_loss="nope"), "policy_loss"),
    (dict(kl="k9"), "kl"),
    (dict(clip_ratio_low=1.0), "clip_ratio_low"),
    (dict(clip_ratio_high=-0.1), "clip_ratio_high"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c"),
    (dict(kl_coef=-1.0), "kl_coef"),
    (dict(entropy_coef=-1.0), "entropy_coef"),
    (dict(loss_agg="seq_mean"), "loss_agg"),
    (dict(loss_agg_micro_rows=0), "loss_agg_micro_rows"),
])
def test_loss_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=rf"^loss\.{field}: .*; allowed: "):
    loss_lib.LossConfig(**kwargs)


def _agg_case(rng, b=6, t=7):
  # Rows of very different lengths and levels, so micro-batches hold different token counts
  # and the two aggregations differ clearly.
  values = (rng.normal(size=(b, t)) + np.array([2.0, 1.0, -2.0, -2.0, 0.0, 0.5])[:b, None])
  values = values.astype(np.float32)
  lengths = np.array([7, 7, 1, 1, 6, 2])[:b]
  mask = np.arange(t)[None] < lengths[:, None]
  return values, mask


def test_loss_agg_token_mean_vs_per_micro_follow_their_formulas():
  """Issue 11 item 4: token_mean = S / N over the mini-batch; token_mean_per_micro (verl) =
  (1/G) sum_g S_g / N_g over G micro-batches of consecutive rows; they differ by exactly
  sum_g S_g (1 / (G N_g) - 1 / N)."""
  rng = np.random.default_rng(7)
  values, mask = _agg_case(rng)
  micro = 2
  s_g = (values * mask).reshape(3, micro, -1).sum((1, 2)).astype(np.float64)
  n_g = mask.reshape(3, micro, -1).sum((1, 2)).astype(np.float64)
  token_mean = s_g.sum() / n_g.sum()
  per_micro = np.mean(s_g / n_g)
  agg = lambda mode: float(loss_lib.weighted_sum(
      jnp.asarray(values), loss_lib.loss_token_weights(jnp.asarray(mask), loss_agg=mode,
                                                       micro_rows=micro)))
  np.testing.assert_allclose(agg("token_mean"), token_mean, rtol=1e-5)
  np.testing.assert_allclose(agg("token_mean_per_micro"), per_micro, rtol=1e-5)
  np.testing.assert_allclose(agg("token_mean_per_micro") - agg("token_mean"),
                             np.sum(s_g * (1 / (3 * n_g) - 1 / n_g.sum())), rtol=1e-4,
                             atol=1e-6)
  assert abs(per_micro - token_mean) > 0.05
  # token_mean is the old masked token-mean; micro_rows = B makes the two identical.
  np.testing.assert_allclose(agg("token_mean"), float(loss_lib.masked_token_mean(
      jnp.asarray(values), jnp.asarray(mask))), rtol=1e-6)
  w_one = loss_lib.loss_token_weights(jnp.asarray(mask), loss_agg="token_mean_per_micro",
                                      micro_rows=6)
  np.testing.assert_allclose(float(loss_lib.weighted_sum(jnp.asarray(values), w_one)),
                             token_mean, rtol=1e-5)
  with pytest.raises(ValueError, match="loss_agg_micro_rows"):
    loss_lib.loss_token_weights(jnp.asarray(mask), loss_agg="token_mean_per_micro",
                                micro_rows=4)
  with pytest.raises(ValueError, match="loss_agg"):
    loss_lib.loss_token_weights(jnp.asarray(mask), loss_agg="seq_mean")


@pytest.mark.parametrize("loss_agg", ["token_mean", "token_mean_per_micro"])
def test_grpo_loss_aggregates_every_term_with_loss_agg(loss_agg):
  """verl applies agg_loss to the policy loss, the KL and the entropy alike."""
  rng = np.random.default_rng(8)
  _, mask = _agg_case(rng)
  b, t = mask.shape
  logp = jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.1 - 1)
  old = logp + jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.1)
  ref = logp + jnp.asarray(rng.normal(size=(b, t)).astype(np.float32) * 0.2)
  adv = jnp.asarray(np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32))
  ent = jnp.asarray(rng.random((b, t)).astype(np.float32))
  cfg = loss_lib.LossConfig(kl_coef=0.01, entropy_coef=0.01, loss_agg=loss_agg,
                            loss_agg_micro_rows=2)
  loss, m = loss_lib.grpo_loss(logp, old, ref, adv, jnp.asarray(mask), config=cfg,
                               entropy_BxT=ent)

  def agg(x):   # the formula, in float64
    x = np.asarray(x, np.float64) * mask
    if loss_agg == "token_mean":
      return x.sum() / mask.sum()
    return np.mean(x.reshape(3, 2, t).sum((1, 2)) / mask.reshape(3, 2, t).sum((1, 2)))
  ratio = np.exp(np.asarray(logp, np.float64) - np.asarray(old, np.float64))
  a = np.asarray(adv, np.float64)
  clipped = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
  pg_tok = np.where(a < 0, np.minimum(clipped, -a * 3.0), clipped)
  d = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
  kl_tok = np.exp(d) - d - 1
  want = agg(pg_tok) + 0.01 * agg(kl_tok) - 0.01 * agg(ent)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["kl"]), agg(kl_tok), rtol=1e-5)
  np.testing.assert_allclose(float(m["entropy"]), agg(ent), rtol=1e-5)
  # Weights given by the caller (a memory micro-batch's share) are used as they are.
  w = loss_lib.loss_token_weights(jnp.asarray(mask), loss_agg=loss_agg, micro_rows=2)
  part = [loss_lib.grpo_loss(logp[r], old[r], ref[r], adv[r], jnp.asarray(mask)[r],
                             config=cfg, entropy_BxT=ent[r], weights_BxT=w[r])[0]
          for r in (np.array([0, 3, 4]), np.array([1, 2, 5]))]
  np.testing.assert_allclose(float(part[0] + part[1]), float(loss), rtol=1e-5)
