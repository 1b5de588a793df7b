"""Random inputs and comparison helpers for the LS-attention tests."""

import jax
import jax.numpy as jnp
import numpy as np


def qkv(seed, b, t, h, kvh, d, s=None, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  s = t if s is None else s
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
  return q, k, v


def max_abs(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def out_and_grads(fn, q, k, v, seed=7):
  """fn(q,k,v) and d/d(q,k,v) of <out, R> for a fixed random cotangent R, in one jit."""
  out_shape = jax.eval_shape(fn, q, k, v)
  r = jax.random.normal(jax.random.PRNGKey(seed), out_shape.shape, jnp.float32)

  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(r.astype(out.dtype))

  return jax.jit(run)(q, k, v)


def grads(fn, q, k, v, seed=7):
  return out_and_grads(fn, q, k, v, seed)[1]


def assert_close(a, b, tol, what=""):
  err = max_abs(a, b)
  assert np.isfinite(err) and err <= tol, f"{what}: max-abs error {err:.3g} > {tol:.3g}"
