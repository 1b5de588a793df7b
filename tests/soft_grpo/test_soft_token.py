"""Soft-token step: filtering, Gumbel noise statistics, modes, rebuild of inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_grpo import modes
from soft_grpo import soft_token as st
from soft_grpo.rollout import RolloutConfig

EULER_GAMMA = 0.5772156649015329


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _maybe_jit(fn, jit, static=("mode", "top_k")):
  return jax.jit(fn, static_argnames=static) if jit else fn


def _np_filter(logits, temperature, top_k, top_p):
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
  pk = np.take_along_axis(p, ids, -1)
  pk = pk / pk.sum(-1, keepdims=True)
  before = np.cumsum(pk, -1) - pk
  keep = before < top_p
  keep[:, 0] = True
  pk = np.where(keep, pk, 0.0)
  return pk / pk.sum(-1, keepdims=True), ids


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_filter_top_k_top_p_matches_numpy(jit, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 40)).astype(np.float32) * 2.5
  f = _maybe_jit(st.filter_top_k_top_p, jit, static=("top_k",))
  p, ids = f(jnp.asarray(logits), temperature=0.7, top_k=5, top_p=top_p)
  p_ref, ids_ref = _np_filter(logits, 0.7, 5, top_p)
  np.testing.assert_array_equal(np.asarray(ids), ids_ref)
  np.testing.assert_allclose(np.asarray(p), p_ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-6)
  assert (np.asarray(p)[:, 0] > 0).all()
  if top_p == 0.05:  # only the top entry survives
    np.testing.assert_allclose(np.asarray(p)[:, 0], 1.0)


def test_unclamped_gumbel_statistics():
  g = np.asarray(st.gumbel_noise_unclamped(jax.random.key(1), (400_000,)), np.float64)
  assert abs(g.mean() - EULER_GAMMA) < 0.01
  assert abs(g.var() - math.pi**2 / 6) < 0.03
  # CDF of Gumbel(0,1) at a few points.
  for x in (-1.0, 0.0, 1.0, 2.5):
    assert abs((g <= x).mean() - math.exp(-math.exp(-x))) < 0.004


def _clamped_gumbel_moments(lo, hi):
  x = np.linspace(lo, hi, 200_001)
  pdf = np.exp(-x - np.exp(-x))
  dx = x[1] - x[0]
  p_lo = math.exp(-math.exp(-lo))
  p_hi = 1.0 - math.exp(-math.exp(-hi))
  m1 = np.trapezoid(x * pdf, dx=dx) + lo * p_lo + hi * p_hi
  m2 = np.trapezoid(x * x * pdf, dx=dx) + lo**2 * p_lo + hi**2 * p_hi
  return m1, m2 - m1**2, p_lo, p_hi


def test_rollout_gumbel_draws_are_clamped_gumbels():
  """Noise recovered from soft_gumbel steps (y' - log(p~+1e-6)) is a clamped Gumbel."""
  rng = np.random.default_rng(0)
  b, v, k = 20_000, 12, 4
  logits = jnp.asarray(rng.normal(size=(b, v)).astype(np.float32))
  emb = jnp.asarray(rng.normal(size=(v, 3)).astype(np.float32))
  out = jax.jit(modes.soft_thinking_step, static_argnames=("mode", "top_k"))(
      jax.random.key(7), logits, emb, mode="soft_gumbel", top_k=k, top_p=1.0,
      tau=0.1, noise_factor=1.0)
  p_tilde, ids = st.filter_top_k_top_p(logits, temperature=1.0, top_k=k, top_p=1.0)
  # Map each stored (sorted) slot back to its p~.
  order = np.argsort(np.asarray(ids), -1)
  ids_sorted = np.take_along_axis(np.asarray(ids), order, -1)
  pos = np.array([np.searchsorted(ids_sorted[i], np.asarray(out.ids_BxK)[i]) for i in range(b)])
  p_slot = np.take_along_axis(np.take_along_axis(np.asarray(p_tilde), order, -1), pos, -1)
  g = (np.asarray(out.y_prime_BxK, np.float64) - np.log(p_slot + 1e-6)).ravel()
  m, var, p_lo, p_hi = _clamped_gumbel_moments(-1.5, 3.0)
  assert g.min() >= -1.5 - 1e-4 and g.max() <= 3.0 + 1e-4
  assert abs(g.mean() - m) < 0.01
  assert abs(g.var() - var) < 0.02
  assert abs((g <= -1.5 + 1e-4).mean() - p_lo) < 0.003
  assert abs((g >= 3.0 - 1e-4).mean() - p_hi) < 0.004


@pytest.mark.parametrize("jit", [False, True])
def test_noise_off_small_tau_gives_argmax_embedding(jit):
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(5, 30)).astype(np.float32) * 2)
  emb = jnp.asarray(rng.normal(size=(30, 8)).astype(np.float32))
  f = _maybe_jit(modes.soft_thinking_step, jit)
  out = f(jax.random.key(0), logits, emb, mode="soft_gumbel", noise_factor=0.0,
          tau=1e-4, top_k=5, top_p=0.95)
  argmax = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(np.asarray(out.recorded_token_B), argmax)
  np.testing.assert_allclose(np.asarray(out.next_embed_BxD), np.asarray(emb)[argmax], atol=1e-5)


@pytest.mark.parametrize("mode", sorted(modes.MODES))
@pytest.mark.parametrize("jit", [False, True])
def test_step_invariants_and_rebuild_roundtrip(mode, jit):
  rng = np.random.default_rng(4)
  b, t, v, d, k = 3, 4, 25, 6, 5
  logits = jnp.asarray(rng.normal(size=(b * t, v)).astype(np.float32) * 2)
  emb = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32))
  f = _maybe_jit(modes.soft_thinking_step, jit)
  tau = 0.3
  out = f(jax.random.key(5), logits, emb, mode=mode, top_k=k, top_p=0.9, tau=tau)
  w = np.asarray(out.weights_BxK)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert (np.diff(w, axis=-1) <= 1e-7).all(), "slots sorted by weight, descending"
  np.testing.assert_array_equal(np.asarray(out.recorded_token_B), np.asarray(out.ids_BxK)[:, 0])
  np.testing.assert_allclose(
      np.asarray(out.entropy_B), np.asarray(st.entropy_from_logits(logits)), rtol=1e-6)
  # Removed (-inf) slots carry zero weight.
  assert (w[~np.isfinite(np.asarray(out.y_prime_BxK))] == 0).all()
  # Rebuild from what is stored, laid out as [B, T, K].
  ids = out.ids_BxK.reshape(b, t, k)
  y = out.y_prime_BxK.reshape(b, t, k)
  rebuilt = modes.rebuild_soft_inputs(ids, y, emb, tau=tau, mode=mode)
  np.testing.assert_allclose(np.asarray(rebuilt).reshape(b * t, d),
                             np.asarray(out.next_embed_BxD), atol=1e-5)
  if mode == "soft_gumbel":
    g = np.asarray(out.y_prime_BxK)
    finite = np.isfinite(g)
    assert (np.argmax(np.where(finite, g, -np.inf), -1) == 0).all(), "recorded = argmax y'"


def test_discrete_positions_rebuild_exactly_and_detached():
  rng = np.random.default_rng(6)
  v, d, k = 20, 7, 4
  emb = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32))
  tok = jnp.asarray(rng.integers(1, v, size=(2, 3)), jnp.int32)
  ids, y = st.one_hot_action(tok, k)
  assert np.isneginf(np.asarray(y)[..., 1:]).all() and (np.asarray(y)[..., 0] == 0).all()
  for mode in modes.MODES:
    rebuilt = modes.rebuild_soft_inputs(ids, y, emb, tau=0.1, mode=mode)
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(emb)[np.asarray(tok)])
  # No gradient flows through the mixture: neither to the table nor to y'.
  soft_ids = jnp.asarray(rng.integers(1, v, size=(2, 3, k)), jnp.int32)
  soft_y = jnp.asarray(rng.normal(size=(2, 3, k)).astype(np.float32))
  g_emb, g_y = jax.grad(
      lambda e, yy: jnp.sum(modes.rebuild_soft_inputs(soft_ids, yy, e, tau=0.1) ** 2),
      argnums=(0, 1))(emb, soft_y)
  assert not np.asarray(g_emb).any() and not np.asarray(g_y).any()


def test_discrete_step_samples_from_filtered_distribution():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9]], jnp.float32))
  logits = jnp.tile(logits, (20_000, 1))
  emb = jnp.eye(6, dtype=jnp.float32)
  out = jax.jit(st.discrete_step, static_argnames=("top_k",))(
      jax.random.key(2), logits, emb, temperature=1.0, top_k=3, top_p=1.0)
  counts = np.bincount(np.asarray(out.recorded_token_B), minlength=6) / 20_000
  np.testing.assert_allclose(counts[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.015)
  assert counts[3:].sum() == 0
  np.testing.assert_array_equal(np.asarray(out.ids_BxK)[:, 1:], 0)
  np.testing.assert_array_equal(np.asarray(out.next_embed_BxD),
                                np.asarray(emb)[np.asarray(out.recorded_token_B)])


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 0.95, 0.7), (12, 0.6, 1.3)])
def test_top_k_sampler_has_the_distribution_of_filter_logits(top_k, top_p, temperature):
  """`sample_top_k_top_p` (draws over K) == categorical over `filter_logits` (over V)."""
  from common.sampler import filter_logits
  logits = jnp.asarray(np.random.RandomState(top_k).randn(3, 200) * 2.0, jnp.float32)
  want = np.asarray(jax.nn.softmax(filter_logits(logits / temperature, top_k=top_k,
                                                 top_p=top_p), axis=-1))
  p_tilde, ids = st.filter_top_k_top_p(logits, temperature=temperature, top_k=top_k,
                                       top_p=top_p)
  got = np.zeros_like(want)
  np.put_along_axis(got, np.asarray(ids), np.asarray(p_tilde), axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # And the draws follow it.
  n = 20_000
  rows = jnp.repeat(logits[:1], n, axis=0)
  tok = jax.jit(st.sample_top_k_top_p, static_argnames=("top_k",))(
      jax.random.key(3), rows, temperature=temperature, top_k=top_k, top_p=top_p)
  freq = np.bincount(np.asarray(tok), minlength=200) / n
  np.testing.assert_allclose(freq, want[0], atol=0.015)
  assert freq[want[0] == 0].sum() == 0


def test_dirichlet_and_gaussian_follow_official_sampler():
  rng = np.random.default_rng(8)
  logits = jnp.asarray(np.tile(rng.normal(size=(1, 10)).astype(np.float32) * 2, (20_000, 1)))
  emb = jnp.asarray(rng.normal(size=(10, 2)).astype(np.float32))
  p_tilde, ids = st.filter_top_k_top_p(logits[:1], temperature=1.0, top_k=4, top_p=1.0)
  p_tilde, ids = np.asarray(p_tilde)[0], np.asarray(ids)[0]
  f = jax.jit(modes.soft_thinking_step, static_argnames=("mode", "top_k"))
  for mode in ("soft_dirichlet", "soft_gaussian"):
    out = f(jax.random.key(9), logits, emb, mode=mode, top_k=4, top_p=1.0)
    # Mean weight of each token id across draws.
    w = np.zeros(10)
    np.add.at(w, np.asarray(out.ids_BxK).ravel(), np.asarray(out.weights_BxK).ravel())
    # Dirichlet(alpha * p~) has mean p~; Gaussian n/sum(n) has mean ~ p~.
    np.testing.assert_allclose(w[ids] / 20_000, p_tilde, atol=0.02)


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="bogus"), "mode"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(tau=0.0), "tau"),
    (dict(noise_factor=-1.0), "noise_factor"),
    (dict(dirichlet_alpha=0.0), "dirichlet_alpha"),
    (dict(gaussian_std=-0.1), "gaussian_std"),
])
def test_bad_config_values_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"^rollout\.{field}: .*; allowed: "):
    RolloutConfig(**kwargs, think_end_ids=(1,))
  # The step function checks its static arguments too.
  logits = jnp.zeros((1, 8))
  emb = jnp.zeros((8, 2))
  step_kwargs = dict(mode="soft_gumbel", top_k=5, **modes.settings_of(RolloutConfig(), "soft_dirichlet"),
                     **modes.settings_of(RolloutConfig(), "soft_gaussian"),
                     **modes.settings_of(RolloutConfig(), "soft_gumbel"))
  step_kwargs.update(kwargs)
  with pytest.raises(ValueError, match=field):
    modes.soft_thinking_step(jax.random.key(0), logits, emb, **step_kwargs)


def test_registry_entries_take_only_their_settings():
  """Every mode's functions accept exactly the settings its entry names."""
  import inspect
  for name, m in modes.MODES.items():
    for fn, names, fixed in ((m.sample, m.sample_settings, {"key", "p_tilde_BxK"}),
                             (m.weights, m.weight_settings, {"y_prime_BxK"}),
                             (m.logprob, m.logprob_settings, None)):
      if fn is None:
        continue
      params = set(inspect.signature(fn).parameters)
      if fixed is None:   # log-probs: (logits, ids, y', *, temperature, <settings>)
        params -= set(list(inspect.signature(fn).parameters)[:3]) | {"temperature"}
      else:
        params -= fixed
      assert params == set(names), (name, fn.__name__, params, names)
  assert not modes.MODES["discrete"].soft and modes.MODES["soft_gumbel"].soft
  with pytest.raises(ValueError, match=r"^rollout\.mode: got 'hard'; allowed: "):
    modes.get_mode("hard")
