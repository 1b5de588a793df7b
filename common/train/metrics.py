"""Metric plumbing: the loss-spike counter (a pure function, run inside the train step),
the metrics.jsonl + TensorBoard writer (scalars, and the run's config as text + hparams),
and a jsonl reader for plots and tests."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"


def spike_update(loss_ema, num_spikes, loss, *, threshold: float, decay: float):
  """Loss-spike counter: a spike is a finite loss more than `threshold` (nats) above the
  EMA of previous losses. Returns (new_ema, new_count, is_spike).

  The EMA starts at the first finite loss (NaN before it) and ignores non-finite losses,
  which are counted separately by the step.
  """
  finite = jnp.isfinite(loss)
  first = jnp.isnan(loss_ema)
  is_spike = finite & ~first & (loss > loss_ema + threshold)
  ema = jnp.where(first, loss, decay * loss_ema + (1.0 - decay) * loss)
  new_ema = jnp.where(finite, ema, loss_ema).astype(jnp.float32)
  return new_ema, num_spikes + is_spike.astype(jnp.int32), is_spike


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
  """Device arrays -> JSON-able python values (vectors become lists)."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.ndim == 0:
      x = a.item()
      out[k] = x
    else:
      out[k] = a.tolist()
  return out


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # "nan" / "inf": strict JSON has no NaN literal
  if isinstance(x, list):
    return [_json_safe(v) for v in x]
  return x


def _from_json(x):
  if isinstance(x, str) and x in ("nan", "inf", "-inf"):
    return float(x)
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


class MetricsWriter:
  """Appends one JSON record per (step, split) to <workdir>/metrics.jsonl and mirrors the
  scalars to TensorBoard (vectors as `<name>/layer_<i>`).

  `resume_step`: records after it (written by a run killed before its next checkpoint) are
  dropped, so the file always reads as one uninterrupted run. None starts a fresh file.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = []
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    with open(self.path, "w") as f:
      for r in kept:
        f.write(json.dumps({k: _json_safe(v) for k, v in r.items()}) + "\n")
    self._f = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    rec = {"step": int(step), "split": split, **to_python(metrics)}
    self._f.write(json.dumps({k: _json_safe(v) for k, v in rec.items()}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k in ("step", "split"):
          continue
        if isinstance(v, list):
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{split}/{k}/layer_{i}", float(x), step)
        elif isinstance(v, (int, float, bool)):
          self._tb.add_scalar(f"{split}/{k}", float(v), step)
    return rec

  def write_config(self, config: dict[str, Any], *,
                   metric_tags: Iterable[str] = ()) -> dict[str, Any]:
    """The run's config in TensorBoard: a `config` text panel (a field | value table) and an
    HParams session in this run's own event file, so the HParams dashboard lines the run up
    with others by its fields (nested sections flattened to `section.field`). `metric_tags`
    (e.g. "val/ppl") are the scalars the dashboard shows beside the hparams. Returns the
    flattened {field: value} that was written (values TensorBoard cannot hold as numbers or
    booleans become strings). No-op without TensorBoard."""
    flat = flat_hparams(config)
    if self._tb is None:
      return flat
    rows = "\n".join(f"| {k} | {_md_cell(v)} |" for k, v in flat.items())
    self._tb.add_text("config", "| field | value |\n|---|---|\n" + rows, 0)
    from tensorboardX.summary import hparams
    exp, ssi, sei = hparams(flat, {tag: 0.0 for tag in metric_tags})
    for summary in (exp, ssi, sei):
      self._tb.file_writer.add_summary(summary)
    self._tb.flush()
    return flat

  def close(self):
    self._f.close()
    if self._tb is not None:
      self._tb.close()


class NoWriter:
  """The writer of processes other than 0: writes nothing (only process 0 writes metrics).
  `write` returns the metrics as python values, like MetricsWriter.write minus step/split."""

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return to_python(metrics)

  def write_config(self, config: dict[str, Any], *, metric_tags: Iterable[str] = ()) -> None:
    pass

  def close(self):
    pass


def flat_hparams(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
  """Nested config (dict, ConfigDict, dataclass) -> {"a.b": scalar}; None, lists and other
  objects become strings (TensorBoard hparams hold only bool / number / string)."""
  import dataclasses
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  elif hasattr(config, "to_dict") and not isinstance(config, dict):
    config = config.to_dict()
  out: dict[str, bool | int | float | str] = {}
  for k, v in dict(config).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) or hasattr(v, "to_dict") or (
        dataclasses.is_dataclass(v) and not isinstance(v, type)):
      out.update(flat_hparams(v, key + "."))
    elif isinstance(v, (bool, int, float, str)):
      out[key] = v
    else:
      out[key] = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
  return dict(sorted(out.items()))


def _md_cell(v) -> str:
  return str(v).replace("|", "\\|").replace("\n", " ")


def read_metrics(path: str, split: str | None = None) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (or a workdir holding one); optionally one split only."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a kill mid-write
      rec = {k: _from_json(v) for k, v in rec.items()}
      if split is None or rec.get("split") == split:
        out.append(rec)
  return out


def series(records: Iterable[dict[str, Any]], key: str):
  """(steps, values) of one scalar key, skipping records without it."""
  steps, vals = [], []
  for r in records:
    if key in r:
      steps.append(r["step"])
      vals.append(r[key])
  return steps, vals
