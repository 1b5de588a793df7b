"""experiments.passk_report on a synthetic reproduction folder."""

import json
import os

import numpy as np
import pytest

from experiments import passk_report


def _eval(path, rng, p_P, mode):
  correct = (rng.random((p_P.size, 32)) < p_P[:, None]).astype(int).tolist()
  with open(path, "w") as f:
    json.dump({"mode": mode, "correct": correct}, f)


def _train(folder, rng, steps=5):
  os.makedirs(folder)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for s in range(1, steps + 1):
      f.write(json.dumps({"step": s, "split": "train", "reward_mean": float(rng.random()),
                          "kl": 1e-4 * s, "response_length": 40.0 + s}) + "\n")


def test_report_tables_and_plots(tmp_path):
  rng = np.random.default_rng(0)
  p = rng.random(16)
  _eval(tmp_path / "eval_base_discrete.json", rng, p, "discrete")
  _eval(tmp_path / "eval_base_soft_gumbel.json", rng, p, "soft_gumbel")
  for s in (0, 1):
    _eval(tmp_path / f"eval_grpo_s{s}.json", rng, p, "discrete")
    _eval(tmp_path / f"eval_softgrpo_s{s}.json", rng, np.clip(p + 0.3, 0, 1), "soft_gumbel")
    _train(tmp_path / f"train_grpo_s{s}", rng)
  md = passk_report.report(str(tmp_path), resamples=200)
  assert (tmp_path / "report.md").read_text() == md
  assert (tmp_path / "passk_vs_k.png").stat().st_size > 10_000
  assert (tmp_path / "training_curves.png").stat().st_size > 10_000
  row = next(ln for ln in md.splitlines() if ln.startswith("| SofT-GRPO | soft_gumbel | 2 |"))
  assert row.count("[") == 3                      # Pass@1, 8, 32 with intervals
  # The +0.3 gain is detected by the paired difference at Pass@1: interval above zero.
  diff = next(ln for ln in md.splitlines() if ln.startswith("| SofT-GRPO − GRPO | unbiased"))
  low = float(diff.split("|")[3].split("[")[1].split(",")[0])
  assert low > 5.0
  assert "| train_grpo_s1 | 5 |" in md


def test_missing_or_old_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="no evaluation files"):
    passk_report.report(str(tmp_path))
  (tmp_path / "eval_base_discrete.json").write_text(json.dumps({"mode": "discrete"}))
  with pytest.raises(ValueError, match="no 'correct' matrix"):
    passk_report.report(str(tmp_path))
  with pytest.raises(ValueError, match="label=glob"):
    passk_report.load_policies(str(tmp_path), ["nolabel"])
