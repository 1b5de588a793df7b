"""experiments.timing: the warm-up calls run but are not timed; the last output comes back."""

import jax.numpy as jnp

from experiments.timing import timed_calls


def test_timed_calls_skips_warmup_and_returns_last_output():
  calls = []

  def fn(i):
    calls.append(i)
    return jnp.arange(3) * i

  times, out = timed_calls(fn, 3, warmup=2)
  assert calls == [0, 1, 2, 3, 4]
  assert len(times) == 3 and all(t >= 0 for t in times)
  assert out.tolist() == [0, 4, 8]
