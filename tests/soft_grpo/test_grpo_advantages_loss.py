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
])
def test_loss_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=rf"^loss\.{field}: .*; allowed: "):
    loss_lib.LossConfig(**kwargs)
