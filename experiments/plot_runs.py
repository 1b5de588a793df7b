"""Plots of LM runs, one line per run: train loss, validation perplexity and the max
|pre-softmax attention logit| (over layers; global and local heads) against step.

  python -m experiments.plot_runs runs/a runs/b ... --out=plots/

Reads each run's metrics.jsonl (experiments/train_lm.py). Writes loss.png, val_ppl.png,
max_logit.png and max_logit_layers.png (per layer, global heads) under --out.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

from common.train.metrics import read_metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "plots", "Folder for the PNG files.")
flags.DEFINE_list("labels", [], "Legend labels, one per run (default: the run folder names).")


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


def plot_runs(workdirs, out_dir: str, labels=None) -> list[str]:
  """Writes the PNGs and returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not workdirs:
    raise ValueError("plot_runs: give at least one run folder")
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
  os.makedirs(out_dir, exist_ok=True)
  paths = []

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, train, _) in enumerate(runs):
    ax.plot(*_finite([r["step"] for r in train], [r.get("loss") for r in train]), label=label,
            lw=1.2, color=f"C{i}")
  ax.set(xlabel="step", ylabel="train loss (nats/token)", title="Training loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, "loss.png")

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, _, val) in enumerate(runs):
    ax.plot(*_finite([r["step"] for r in val], [r.get("ppl") for r in val]), marker="o", ms=3,
            label=label, color=f"C{i}")
  ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity",
         yscale="log")
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
              title="Global heads (all MHSA heads)", yscale="log")
  axes[1].set(xlabel="step", title="Local (sliding-window) heads", yscale="log")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  save(fig, "max_logit.png")

  num_layers = max((len(r.get("max_logit_global", [])) for _, t, _ in runs for r in t[-1:]),
                   default=0)
  if num_layers:
    cols = min(num_layers, 4)
    rows = -(-num_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False,
                             sharex=True)
    for layer in range(num_layers):
      ax = axes[layer // cols][layer % cols]
      for i, (label, train, _) in enumerate(runs):
        pts = [(r["step"], r["max_logit_global"][layer]) for r in train
               if len(r.get("max_logit_global", [])) > layer]
        ax.plot(*_finite([p[0] for p in pts], [p[1] for p in pts]), label=label, lw=1.0,
                color=f"C{i}")
      ax.set_title(f"layer {layer}: global max |logit|", fontsize=9)
      ax.set_yscale("log")
      ax.grid(alpha=0.3)
    for k in range(num_layers, rows * cols):
      axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    save(fig, "max_logit_layers.png")
  return paths


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
    paths = plot_runs(argv[1:], FLAGS.out, FLAGS.labels)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary_table(argv[1:], FLAGS.labels or None))
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
