"""experiments.plot_runs: PNGs land in <first run>/plots by default; perplexity on a plain
linear axis; raw + EMA-smoothed loss; labelled per-layer panels with readable log ticks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import plot_runs


def _write_run(path, seed, *, layers=3, steps=30, local=True):
  rng = np.random.default_rng(seed)
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for s in range(1, steps + 1):
      glob = (20 + 5 * rng.random(layers) + s).tolist()
      loc = (10 + rng.random(layers)).tolist() if local else [0.0] * layers
      f.write(json.dumps({"step": s, "split": "train", "loss": 3.0 - s / 20 + rng.normal(0, 0.2),
                          "max_logit_global": glob, "max_logit_local": loc}) + "\n")
      if s % 10 == 0:
        f.write(json.dumps({"step": s, "split": "val", "loss": 3.06 - s / 300,
                            "ppl": float(np.exp(3.06 - s / 300)), "max_logit_global": glob,
                            "max_logit_local": loc}) + "\n")
  return str(path)


@pytest.fixture
def runs(tmp_path):
  return [_write_run(tmp_path / "ls_run", 0), _write_run(tmp_path / "mhsa_run", 1, local=False)]


def test_pngs_default_into_first_run(runs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  paths = plot_runs.plot_runs(runs)
  want = [os.path.join(runs[0], "plots", n) for n in
          ("loss.png", "val_ppl.png", "max_logit.png", "max_logit_layers.png")]
  assert paths == want
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
    assert os.path.getsize(p) > 5000, p
  assert not os.path.exists(tmp_path / "plots")     # never the current directory
  out = plot_runs.plot_runs(runs, str(tmp_path / "figs"))
  assert all(p.startswith(str(tmp_path / "figs")) for p in out)


def test_axes_scales_labels_and_smoothing(runs):
  figs = plot_runs.make_figures(runs, ["LS", "MHSA"], smoothing=0.8)
  ppl = figs["val_ppl.png"].axes[0]
  assert ppl.get_yscale() == "linear"
  fmt = ppl.yaxis.get_major_formatter()
  ticks = [t for t in ppl.get_yticks() if ppl.get_ylim()[0] <= t <= ppl.get_ylim()[1]]
  labels = [fmt(t) for t in ticks]
  assert labels and all("x10" not in lab and "e" not in lab and "$" not in lab for lab in labels)
  assert all(abs(float(lab) - t) < 1e-6 for lab, t in zip(labels, ticks))
  assert ppl.get_ylabel() == "validation perplexity" and ppl.get_xlabel() == "step"

  loss = figs["loss.png"].axes[0]
  lines = {line.get_label(): line for line in loss.get_lines()}
  assert set(lines) == {"LS (raw)", "LS (EMA 0.8)", "MHSA (raw)", "MHSA (EMA 0.8)"}
  raw = lines["LS (raw)"].get_ydata()
  want = []
  acc = 0.0
  for i, x in enumerate(raw):    # debiased EMA, written out independently
    acc = 0.8 * acc + 0.2 * x
    want.append(acc / (1 - 0.8 ** (i + 1)))
  np.testing.assert_allclose(lines["LS (EMA 0.8)"].get_ydata(), want, rtol=1e-12)
  assert np.std(np.diff(want)) < np.std(np.diff(raw))   # smoother than the raw curve

  panels = [ax for ax in figs["max_logit_layers.png"].axes if ax.get_visible() and ax.axison]
  assert [ax.get_title() for ax in panels] == [f"layer {i}: global heads" for i in range(3)]
  for ax in panels:
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "max |pre-softmax logit|"
    assert ax.get_yscale() == "log"
    fmt = ax.yaxis.get_minor_formatter()      # the data span < 1 decade: minor ticks labelled
    assert fmt(30.0) == "30" and fmt(40.0) == "40"

  both = figs["max_logit.png"].axes
  assert [ax.get_ylabel() for ax in both] == ["max |pre-softmax logit| over layers"] * 2
  assert [len(ax.get_lines()) for ax in both] == [2, 1]   # MHSA has no local heads


def test_bad_input_is_one_line(runs, tmp_path):
  with pytest.raises(ValueError, match="has no metrics.jsonl"):
    plot_runs.plot_runs([str(tmp_path)])
  with pytest.raises(ValueError, match=r"smoothing=1.0; allowed: \[0, 1\)"):
    plot_runs.plot_runs(runs, smoothing=1.0)
  with pytest.raises(ValueError, match="1 labels for 2 runs"):
    plot_runs.plot_runs(runs, labels=["x"])
