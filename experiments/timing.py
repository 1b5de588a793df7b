"""The benchmarks' one timing loop: wall seconds of calls after warm-up (compilation)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def timed_calls(fn: Callable[[int], Any], repeats: int, *,
                warmup: int = 1) -> tuple[list[float], Any]:
  """Calls fn(i) for i = 0 .. warmup + repeats - 1, each until its outputs are ready, and
  returns the wall seconds of the last `repeats` calls (the first `warmup` ones compile and
  are not timed) and the last call's output."""
  times, out = [], None
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(i))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times, out
