"""The xla LS-attention path against the dense float32 reference: outputs, grads, stats."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ls_attention import ls_attention, ls_attention_reference
from ls_attention import xla as xla_impl
from tests.ls_attention.helpers import assert_close, out_and_grads, qkv

F32_TOL = 2e-5
# bf16 inputs: probabilities are cast to bf16 for the PV product and the output is rounded to
# bf16 (8-bit mantissa), so errors of a few 1e-3 relative to O(1) outputs are expected.
BF16_TOL = 3e-2

# (b, t, h, kvh, d, window, num_local_heads): band path (t >= 2*(n_prev+1)*chunk), prefix path,
# T not a multiple of the chunk, window=1, window >= T, num_local_heads in {0, 1, H-1, H},
# KVH in {1, 2, H}, batch > 1, a GQA group cut by the local/global boundary (5 of 6, G=3).
CASES = [
    (2, 77, 4, 2, 8, 5, 1),
    (1, 50, 4, 1, 8, 1, 4),
    (1, 40, 4, 4, 8, 64, 3),
    (2, 200, 6, 2, 16, 33, 5),
    (1, 30, 4, 2, 8, 7, 0),
    (1, 70, 4, 2, 8, 20, 2),
]


def _op(impl, nl, w, cap=None, start_B=None):
  return jax.jit(functools.partial(ls_attention, num_local_heads=nl, window=w,
                                   implementation=impl, logits_soft_cap=cap, start_B=start_B))


@pytest.mark.parametrize("case", CASES)
def test_xla_matches_reference_forward_and_grads(case):
  b, t, h, kvh, d, w, nl = case
  q, k, v = qkv(hash(case) % 1000, b, t, h, kvh, d)
  out_x, g_x = out_and_grads(_op("xla", nl, w), q, k, v)
  out_r, g_r = out_and_grads(_op("reference", nl, w), q, k, v)
  assert_close(out_x, out_r, F32_TOL, "out")
  for name, gx, gr in zip("qkv", g_x, g_r):
    assert_close(gx, gr, F32_TOL, f"d{name}")


def test_soft_cap_and_padding_match_reference():
  q, k, v = qkv(3, 2, 90, 4, 2, 8)
  start_B = jnp.array([0, 11])
  out, g_x = out_and_grads(_op("xla", 3, 6, cap=2.0, start_B=start_B), q, k, v)
  ref, g_r = out_and_grads(_op("reference", 3, 6, cap=2.0, start_B=start_B), q, k, v)
  assert_close(out, ref, F32_TOL, "out")
  assert float(jnp.max(jnp.abs(out[1, :11]))) == 0.0  # rows before start see nothing -> 0
  assert float(jnp.max(jnp.abs(out))) <= float(jnp.max(jnp.abs(v)))  # convex combination
  for gx, gr in zip(g_x, g_r):
    assert_close(gx, gr, F32_TOL, "grad")


def test_eager_equals_jit():
  q, k, v = qkv(4, 1, 20, 4, 2, 8)
  eager = ls_attention(q, k, v, num_local_heads=2, window=9, implementation="xla")
  assert_close(eager, _op("xla", 2, 9)(q, k, v), 1e-6, "eager vs jit")


def test_window_ge_t_is_causal_mhsa():
  q, k, v = qkv(5, 2, 40, 4, 2, 8)
  mhsa = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  for impl, window in (("reference", 40), ("xla", 40), ("xla", 1000)):
    assert_close(_op(impl, 4, window)(q, k, v), mhsa, F32_TOL, f"{impl} window={window}")


def test_bf16_tolerance():
  q, k, v = qkv(6, 1, 96, 4, 2, 16, dtype=jnp.bfloat16)
  out, gx = out_and_grads(_op("xla", 3, 10), q, k, v)
  assert out.dtype == jnp.bfloat16
  ref, gr = out_and_grads(_op("reference", 3, 10), *(x.astype(jnp.float32) for x in (q, k, v)))
  assert_close(out, ref, BF16_TOL, "bf16 out")
  for a, r in zip(gx, gr):
    assert a.dtype == jnp.bfloat16
    # grads are sums over many bf16 terms: compare relative to their scale
    assert_close(a, r, BF16_TOL * max(1.0, float(jnp.max(jnp.abs(r)))), "bf16 grad")


@pytest.mark.parametrize("nl", [0, 3, 4])
def test_stats_match_dense_reference(nl):
  q, k, v = qkv(8, 2, 80, 4, 2, 8)
  q = q * 3.0  # larger logits, so max |logit| is not trivially similar across heads
  start_B = jnp.array([0, 5])
  _, rs = ls_attention(q, k, v, num_local_heads=nl, window=6, implementation="reference",
                       return_stats=True, logits_soft_cap=20.0, start_B=start_B)
  _, xs = jax.jit(functools.partial(ls_attention, num_local_heads=nl, window=6,
                                    implementation="xla", return_stats=True,
                                    logits_soft_cap=20.0, start_B=start_B))(q, k, v)
  assert set(xs) == {"local_max_abs_logit", "local_mean_lse", "global_max_abs_logit",
                     "global_mean_lse"}
  for key in rs:
    assert_close(xs[key], rs[key], 1e-4, key)
  if nl == 0:
    assert float(xs["local_max_abs_logit"]) == 0.0 and float(xs["local_mean_lse"]) == 0.0
  if nl == 4:
    assert float(xs["global_max_abs_logit"]) == 0.0 and float(xs["global_mean_lse"]) == 0.0
  if 0 < nl < 4:
    assert float(xs["local_mean_lse"]) < float(xs["global_mean_lse"])  # fewer keys


def test_stats_against_hand_computation():
  """The reference's stats themselves, from an explicit numpy loop."""
  q, k, v = qkv(9, 1, 12, 2, 1, 4)
  _, st = jax.jit(functools.partial(ls_attention_reference, num_local_heads=1, window=3,
                                    return_stats=True))(q, k, v)
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for head, name in ((0, "local"), (1, "global")):
    lses, mx = [], 0.0
    for i in range(12):
      lo = i - 2 if head == 0 else 0
      s = [qn[0, i, head] @ kn[0, j, 0] / 2.0 for j in range(max(lo, 0), i + 1)]
      lses.append(np.log(np.sum(np.exp(s))))
      mx = max(mx, np.max(np.abs(s)))
    np.testing.assert_allclose(st[f"{name}_mean_lse"], np.mean(lses), rtol=1e-5)
    np.testing.assert_allclose(st[f"{name}_max_abs_logit"], mx, rtol=1e-5)


def test_band_block_any_chunk():
  q, k, v = qkv(10, 2, 61, 4, 2, 8)

  @jax.jit
  def run(q, k, v):
    res = []
    for chunk, window in ((8, 1), (8, 9), (16, 16), (5, 23)):
      res.append((ls_attention_reference(q, k, v, num_local_heads=4, window=window),
                  xla_impl.band_attention(q, k, v, window=window, chunk=chunk)[0]))
    return res

  for i, (ref, out) in enumerate(run(q, k, v)):
    assert_close(out, ref, F32_TOL, f"band case {i}")


def test_prefix_block_any_num_blocks():
  q, k, v = qkv(11, 1, 45, 4, 2, 8, s=52)  # queries aligned to the end of longer keys

  @jax.jit
  def run(q, k, v):
    res = []
    for nb, window, nl in ((2, None, 0), (7, None, 0), (3, 6, 4)):
      res.append((ls_attention_reference(q, k, v, num_local_heads=nl, window=window or 1),
                  xla_impl.prefix_attention(q, k, v, window=window, num_blocks=nb)[0]))
    return res

  for i, (ref, out) in enumerate(run(q, k, v)):
    assert_close(out, ref, F32_TOL, f"prefix case {i}")


@pytest.mark.parametrize("nl", [4, 2])
def test_causality_by_gradient(nl):
  """Output at t has zero grad w.r.t. inputs after t; local heads also before t - window."""
  b, t, h, kvh, d, w = 1, 64, 4, 4, 8, 5
  q, k, v = qkv(12, b, t, h, kvh, d)
  t0 = 40
  for impl in ("xla", "reference"):
    fn = lambda q, k, v: jnp.sum(ls_attention(q, k, v, num_local_heads=nl, window=w,
                                              implementation=impl)[:, t0])
    gq, gk, gv = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v)
    for g in (gq, gk, gv):
      assert float(jnp.max(jnp.abs(g[:, t0 + 1:]))) == 0.0
    assert float(jnp.max(jnp.abs(gk[:, t0]))) > 0.0
    # local kv heads (kvh == h here) see only (t0 - w, t0]
    assert float(jnp.max(jnp.abs(gk[:, :t0 - w + 1, :nl]))) == 0.0
    assert float(jnp.max(jnp.abs(gv[:, :t0 - w + 1, :nl]))) == 0.0
    if nl < h:
      assert float(jnp.max(jnp.abs(gv[:, :t0 - w + 1, nl:]))) > 0.0


@pytest.mark.parametrize("kwargs,shapes,match", [
    (dict(num_local_heads=5, window=3), None, "num_local_heads"),
    (dict(num_local_heads=-1, window=3), None, "num_local_heads"),
    (dict(num_local_heads=1, window=0), None, "window"),
    (dict(num_local_heads=1, window=3), ((1, 8, 4, 8), (1, 8, 3, 8)), "KVH"),
    (dict(num_local_heads=1, window=3), ((1, 8, 4, 8), (1, 8, 2, 16)), "head dim"),
    (dict(num_local_heads=1, window=3), ((1, 8, 4, 8), (2, 8, 2, 8)), "batch"),
    (dict(num_local_heads=1, window=3), ((1, 8, 4, 8), (1, 4, 2, 8)), "length"),
    (dict(num_local_heads=1, window=3), ((1, 8, 32), (1, 8, 2, 8)), "q must be"),
    (dict(num_local_heads=1, window=3, implementation="cuda"), None, "implementation"),
    (dict(num_local_heads=1, window=3, logits_soft_cap=0.0), None, "logits_soft_cap"),
])
def test_value_errors_name_the_argument(kwargs, shapes, match):
  qs, ks = shapes or ((1, 8, 4, 8), (1, 8, 2, 8))
  q, k = jnp.ones(qs), jnp.ones(ks)
  with pytest.raises(ValueError, match=match):
    ls_attention(q, k, k, **kwargs)


def test_v_shape_must_match_k():
  with pytest.raises(ValueError, match="v shape"):
    ls_attention(jnp.ones((1, 8, 4, 8)), jnp.ones((1, 8, 2, 8)), jnp.ones((1, 8, 2, 4)),
                 num_local_heads=1, window=2)


def test_auto_picks_xla_on_cpu():
  from ls_attention.ops import resolve_implementation
  if jax.default_backend() == "cpu":
    assert resolve_implementation("auto") == "xla"


def test_queries_aligned_to_end_of_longer_keys():
  """S > T (a prefill after earlier tokens): query i sits at key position i + S - T."""
  q, _, _ = qkv(13, 2, 70, 4, 2, 8)
  _, k, v = qkv(14, 2, 85, 4, 2, 8)
  start_B = jnp.array([3, 20])
  out_x, g_x = out_and_grads(_op("xla", 3, 5, start_B=start_B), q, k, v)
  out_r, g_r = out_and_grads(_op("reference", 3, 5, start_B=start_B), q, k, v)
  assert_close(out_x, out_r, F32_TOL, "out")
  for name, gx, gr in zip("qkv", g_x, g_r):
    assert_close(gx, gr, F32_TOL, f"d{name}")


def test_local_heads_never_materialise_t_by_t():
  """Compiled temporary memory of the all-local xla path (with stats and backward) stays far
  below one T x T float32 score matrix per head."""
  b, t, h, d, w = 1, 2048, 2, 16, 16
  spec = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  fn = functools.partial(ls_attention, num_local_heads=h, window=w, implementation="xla")
  dense_bytes = h * t * t * 4
  fwd_stats = jax.jit(functools.partial(fn, return_stats=True)).lower(spec, spec, spec)
  bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
  for name, lowered in (("fwd+stats", fwd_stats), ("fwd+bwd", bwd.lower(spec, spec, spec))):
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert 0 < temp < dense_bytes / 8, f"{name}: {temp} bytes of temporaries"
