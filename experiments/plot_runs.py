"""Plots of LM runs, one colour per run: train loss (raw and EMA-smoothed), validation
perplexity (linear axis) and the max |pre-softmax attention logit| (over layers; global and
local heads; per layer) against step.

  python -m experiments.plot_runs runs/a runs/b ...            # -> runs/a/plots/
  python -m experiments.plot_runs runs/a runs/b --out=figs/ --smoothing=0.95

Reads each run's metrics.jsonl (experiments/train_lm.py). Writes loss.png, val_ppl.png,
max_logit.png and max_logit_layers.png (one labelled panel per layer, global heads) under
--out, which defaults to the first run's folder (`<run>/plots`), never the current directory.
Log axes (max |logit|) carry plain-number tick labels.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

from experiments import cli

from common.train.metrics import read_metrics

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a script (importing the module defines no flags)."""
  flags.DEFINE_string("out", None, "Folder for the PNG files (default: <first run>/plots).")
  flags.DEFINE_list("labels", [], "Legend labels, one per run (default: the run folder names).")
  flags.DEFINE_float("smoothing", 0.9, "EMA weight of the smoothed loss curve, in [0, 1).")

PLOTS_DIR = "plots"


def default_out_dir(workdirs) -> str:
  """Where plots go when --out is not given: inside the first run's folder."""
  return os.path.join(workdirs[0], PLOTS_DIR)


def ema(values, weight: float) -> list[float]:
  """Debiased exponential moving average (TensorBoard's smoothing): point i is
  sum_j w^(i-j) (1-w) x_j / (1 - w^(i+1)), so the first points are not pulled to zero."""
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"plot_runs: smoothing={weight!r}; allowed: [0, 1)")
  out, acc = [], 0.0
  for i, x in enumerate(values):
    acc = weight * acc + (1.0 - weight) * x
    out.append(acc / (1.0 - weight ** (i + 1)))
  return out


def _readable_log_axis(ax) -> None:
  """Log y axis whose ticks read as plain numbers (20, 50, 100), not 2x10^1; when the data
  span less than a decade, the minor ticks are labelled too so the axis is never bare."""
  from matplotlib import ticker
  ax.set_yscale("log")
  plain = ticker.FuncFormatter(lambda y, _: f"{y:g}")
  ax.yaxis.set_major_formatter(plain)
  lo, hi = ax.get_ylim()
  if lo > 0 and hi / lo < 10:
    ax.yaxis.set_minor_formatter(plain)
  else:
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _plain_linear_axis(ax) -> None:
  """Linear y axis without an offset or scientific multiplier (ticks read 20.5, 21.0)."""
  from matplotlib import ticker
  ax.set_yscale("linear")
  fmt = ticker.ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  ax.yaxis.set_major_formatter(fmt)


def _finite(steps, vals):
  pairs = [(s, v) for s, v in zip(steps, vals)
           if isinstance(v, (int, float)) and math.isfinite(v)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _layer_max(records, key):
  steps, vals = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, list) and v:
      steps.append(r["step"])
      vals.append(max(v))
  return steps, vals


def plot_runs(workdirs, out_dir: str | None = None, labels=None, *,
              smoothing: float = 0.9) -> list[str]:
  """Writes the PNGs (under `out_dir`, default `<first run>/plots`) and returns their paths."""
  import matplotlib.pyplot as plt

  figs = make_figures(workdirs, labels, smoothing=smoothing)
  out_dir = out_dir or default_out_dir(workdirs)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, fig in figs.items():
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def make_figures(workdirs, labels=None, *, smoothing: float = 0.9) -> dict:
  """{png name: matplotlib Figure} of the runs (not saved; `plot_runs` saves them)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not workdirs:
    raise ValueError("plot_runs: give at least one run folder")
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"plot_runs: smoothing={smoothing!r}; allowed: [0, 1)")
  labels = list(labels or [])
  if labels and len(labels) != len(workdirs):
    raise ValueError(f"plot_runs: {len(labels)} labels for {len(workdirs)} runs")
  runs = []
  for i, w in enumerate(workdirs):
    if not os.path.exists(os.path.join(w, "metrics.jsonl")):
      raise ValueError(f"plot_runs: {w!r} has no metrics.jsonl")
    recs = read_metrics(w)
    label = labels[i] if labels else os.path.basename(os.path.normpath(w))
    runs.append((label, [r for r in recs if r.get("split") == "train"],
                 [r for r in recs if r.get("split") == "val"]))
  figs = {}

  def save(fig, name):
    fig.tight_layout()
    figs[name] = fig

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, train, _) in enumerate(runs):
    steps, loss = _finite([r["step"] for r in train], [r.get("loss") for r in train])
    ax.plot(steps, loss, lw=0.8, alpha=0.3, color=f"C{i}", label=f"{label} (raw)")
    ax.plot(steps, ema(loss, smoothing), lw=1.6, color=f"C{i}",
            label=f"{label} (EMA {smoothing:g})")
  ax.set(xlabel="step", ylabel="train loss (nats/token)",
         title=f"Training loss: raw (faint) and EMA-smoothed (weight {smoothing:g})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, "loss.png")

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, _, val) in enumerate(runs):
    ax.plot(*_finite([r["step"] for r in val], [r.get("ppl") for r in val]), marker="o", ms=3,
            label=label, color=f"C{i}")
  ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity")
  _plain_linear_axis(ax)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, "val_ppl.png")

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for i, (label, train, _) in enumerate(runs):
    axes[0].plot(*_finite(*_layer_max(train, "max_logit_global")), label=label, lw=1.2,
                 color=f"C{i}")
    s, v = _finite(*_layer_max(train, "max_logit_local"))
    if any(x > 0 for x in v):  # MHSA has no local heads (reported as 0)
      axes[1].plot(s, v, label=label, lw=1.2, color=f"C{i}")
  axes[0].set(xlabel="step", ylabel="max |pre-softmax logit| over layers",
              title="Global heads (all MHSA heads)")
  axes[1].set(xlabel="step", ylabel="max |pre-softmax logit| over layers",
              title="Local (sliding-window) heads")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    if any(len(line.get_ydata()) for line in ax.get_lines()):
      _readable_log_axis(ax)
  save(fig, "max_logit.png")

  num_layers = max((len(r.get("max_logit_global", [])) for _, t, _ in runs for r in t[-1:]),
                   default=0)
  if num_layers:
    cols = min(num_layers, 4)
    rows = -(-num_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for layer in range(num_layers):
      ax = axes[layer // cols][layer % cols]
      for i, (label, train, _) in enumerate(runs):
        pts = [(r["step"], r["max_logit_global"][layer]) for r in train
               if len(r.get("max_logit_global", [])) > layer]
        ax.plot(*_finite([p[0] for p in pts], [p[1] for p in pts]), label=label, lw=1.0,
                color=f"C{i}")
      ax.set_title(f"layer {layer}: global heads", fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.set_ylabel("max |pre-softmax logit|", fontsize=8)
      ax.tick_params(labelsize=7)
      _readable_log_axis(ax)
      ax.grid(alpha=0.3)
    for k in range(num_layers, rows * cols):
      axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Max |pre-softmax attention logit| per layer (global heads)", fontsize=10)
    save(fig, "max_logit_layers.png")
  return figs


def run_summary(workdir: str) -> dict:
  """Final val loss/ppl, final and peak max-logit (over layers, global and local heads),
  spike and non-finite counts, and wall time (from summary.json when the run finished)."""
  import json
  recs = read_metrics(workdir)
  train = [r for r in recs if r.get("split") == "train"]
  val = [r for r in recs if r.get("split") == "val"]
  out = {"run": os.path.basename(os.path.normpath(workdir)),
         "steps": train[-1]["step"] if train else 0,
         "val_loss": val[-1]["loss"] if val else float("nan"),
         "val_ppl": val[-1]["ppl"] if val else float("nan")}
  for kind in ("global", "local"):
    _, v = _finite(*_layer_max(train, f"max_logit_{kind}"))
    out[f"final_max_logit_{kind}"] = v[-1] if v else float("nan")
    out[f"peak_max_logit_{kind}"] = max(v) if v else float("nan")
  out["spikes"] = train[-1].get("num_spikes", 0) if train else 0
  out["nonfinite"] = train[-1].get("num_nonfinite", 0) if train else 0
  out["wall_s"] = float("nan")
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      out["wall_s"] = json.load(f).get("wall_s", float("nan"))
  return out


def summary_table(workdirs, labels=None) -> str:
  """A Markdown table, one row per run."""
  head = ("| run | steps | final val ppl | max-logit global (final / peak) | "
          "max-logit local (final / peak) | spikes | non-finite | wall s |")
  lines = [head, "|" + "---|" * 8]
  for i, w in enumerate(workdirs):
    s = run_summary(w)
    name = labels[i] if labels else s["run"]
    local = ("-" if not s["peak_max_logit_local"] > 0 else
             f"{s['final_max_logit_local']:.1f} / {s['peak_max_logit_local']:.1f}")
    lines.append(f"| {name} | {s['steps']} | {s['val_ppl']:.3f} | "
                 f"{s['final_max_logit_global']:.1f} / {s['peak_max_logit_global']:.1f} | "
                 f"{local} | {s['spikes']} | {s['nonfinite']} | {s['wall_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  try:
    paths = plot_runs(argv[1:], FLAGS.out, FLAGS.labels, smoothing=FLAGS.smoothing)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary_table(argv[1:], FLAGS.labels or None))
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main, positional=True)
