"""Spike counter and the metrics.jsonl writer (resume truncation, NaN round trip)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from common.train import metrics


def test_spike_counter_counts_jumps_above_ema():
  ema, count = jnp.float32(jnp.nan), jnp.int32(0)
  losses = [3.0, 2.9, 2.8, 3.6, 2.7, float("nan"), 2.75, 2.7]
  flags = []
  for x in losses:
    ema, count, spike = metrics.spike_update(ema, count, jnp.float32(x), threshold=0.5, decay=0.9)
    flags.append(bool(spike))
  assert flags == [False, False, False, True, False, False, False, False]
  assert int(count) == 1 and np.isfinite(float(ema))
  # A float64 reference of the EMA (NaN skipped, first finite loss starts it).
  ref = None
  for x in losses:
    if math.isfinite(x):
      ref = x if ref is None else 0.9 * ref + 0.1 * x
  np.testing.assert_allclose(float(ema), ref, rtol=1e-6)


def test_writer_truncates_on_resume_and_round_trips_nan(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
  for s in range(1, 6):
    w.write(s, "train", {"loss": jnp.float32(1.0 / s), "max_logit_global": jnp.arange(2.0) + s})
  w.write(4, "val", {"loss": 0.5, "ppl": math.e ** 0.5})
  w.write(5, "train", {"loss": jnp.float32(jnp.nan)})
  w.close()
  # Resume from a checkpoint at step 3: later records (from the killed run) are dropped.
  w = metrics.MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False)
  w.write(4, "train", {"loss": jnp.float32(jnp.nan)})
  w.close()
  recs = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  assert recs[1]["max_logit_global"] == [2.0, 3.0]
  assert math.isnan(recs[-1]["loss"])
  steps, vals = metrics.series(metrics.read_metrics(str(tmp_path), "train"), "loss")
  assert steps == [1, 2, 3, 4] and vals[0] == 1.0
