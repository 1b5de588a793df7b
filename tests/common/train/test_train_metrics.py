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


def test_no_writer_writes_nothing_and_returns_python_values(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  w = metrics.NoWriter()
  w.write_config({"lr": 1e-3}, metric_tags=("train/loss",))
  rec = w.write(1, "train", {"loss": jnp.float32(0.5), "v": jnp.arange(2.0)})
  w.close()
  assert rec == {"loss": 0.5, "v": [0.0, 1.0]} and isinstance(rec["loss"], float)
  assert list(tmp_path.iterdir()) == []


def _tb_events(logdir):
  """Every Event in the TFRecord event files under `logdir` (length, crc, data, crc)."""
  import glob
  import os
  import struct
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[pos + 12:pos + 12 + n])
      events.append(ev)
      pos += 12 + n + 4
  return events


def test_write_config_as_text_and_hparams(tmp_path):
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  config = {"lr": 3e-3, "attention": "ls", "progress": True, "num_steps": 10,
            "model": {"window": 16, "rope_scaling": None}, "tags": ["a", "b"],
            "note": "x | y"}
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
  flat = w.write_config(config, metric_tags=("val/ppl",))
  w.write(1, "val", {"ppl": 3.0})
  w.close()
  assert flat == {"attention": "ls", "lr": 3e-3, "model.rope_scaling": "None",
                  "model.window": 16, "note": "x | y", "num_steps": 10, "progress": True,
                  "tags": '["a", "b"]'}
  values = [v for ev in _tb_events(str(tmp_path / "tb")) for v in ev.summary.value]
  text = [v for v in values if v.tag.startswith("config")]
  assert len(text) == 1
  table = text[0].tensor.string_val[0].decode()
  assert "| model.window | 16 |" in table and "| note | x \\| y |" in table
  plugin = {v.tag: HParamsPluginData.FromString(v.metadata.plugin_data.content)
            for v in values if v.tag.startswith("_hparams_")}
  start = plugin["_hparams_/session_start_info"].session_start_info.hparams
  assert start["lr"].number_value == 3e-3 and start["attention"].string_value == "ls"
  assert start["progress"].bool_value is True and start["model.window"].number_value == 16
  exp = plugin["_hparams_/experiment"].experiment
  assert [m.name.tag for m in exp.metric_infos] == ["val/ppl"]
  # Without TensorBoard the call is harmless and still reports what it would write.
  w = metrics.MetricsWriter(str(tmp_path / "no_tb"), tensorboard=False)
  assert w.write_config({"a": {"b": 1}}) == {"a.b": 1}
  w.close()
