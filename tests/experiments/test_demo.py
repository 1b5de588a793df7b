"""Issue 14 item 3: `make demo` is quiet, small and says where its results are (the pieces that
run in seconds; the full demo on SmolLM2 takes about 10 minutes and is run by hand)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import demo, grpo_demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_config(d, params_only):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"config": {"run": {"checkpoint_params_only": params_only}}}, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write("{}\n")


def test_fresh_workdir_replaces_an_earlier_demo_run_and_refuses_anything_else(tmp_path):
  grpo_demo.fresh_workdir(str(tmp_path / "new"))            # absent: nothing to do
  (tmp_path / "empty").mkdir()
  grpo_demo.fresh_workdir(str(tmp_path / "empty"))
  earlier = str(tmp_path / "earlier")
  _write_config(earlier, True)
  grpo_demo.fresh_workdir(earlier)
  assert not os.path.exists(earlier)
  for name, params_only in (("training_run", False), ("old_run", None)):
    d = str(tmp_path / name)
    _write_config(d, params_only)
    with pytest.raises(ValueError, match=r"^--workdir .*: not empty and not an earlier demo run"):
      grpo_demo.fresh_workdir(d)
    assert sorted(os.listdir(d)) == ["config.json", "metrics.jsonl"]   # nothing deleted
  other = tmp_path / "notes"
  other.mkdir()
  (other / "a.txt").write_text("keep")
  with pytest.raises(ValueError, match="not an earlier demo run"):
    grpo_demo.fresh_workdir(str(other))
  assert (other / "a.txt").read_text() == "keep"


def test_closing_lines_name_results_plots_tensorboard_and_the_checkpoint_kind(tmp_path):
  root = str(tmp_path)
  (tmp_path / "f.bin").write_bytes(b"x" * 3 * 2**20)
  text = demo.where_results_are(root, {"generate", "ls", "grpo"}, seconds=61.2,
                                python=".venv/bin/python")
  lines = text.splitlines()
  assert lines[0] == f"== done in 61s; results in {root} (3 MB on disk) =="
  assert any("ls_vs_mhsa/plots" in ln and "PNG" in ln for ln in lines)
  assert f"tensorboard --logdir {root}" in text
  assert "checkpoints/ (params only: a model, not resumable)" in text
  assert f".venv/bin/python -m experiments.generate --model={root}/soft_grpo" in text
  assert len(lines) <= 8
  only_generate = demo.where_results_are(root, {"generate"}, seconds=5, python="python")
  assert only_generate.count("\n") == 0 and "tensorboard" not in only_generate


def test_demo_rejects_an_unknown_part_in_one_line():
  res = subprocess.run([sys.executable, "-m", "experiments.demo", "--skip=generate,grpoo"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert res.returncode == 1
  assert res.stderr.strip() == ("error: --skip: unknown part(s) ['grpoo']; allowed: "
                                "['generate', 'ls', 'grpo']")


def test_grpo_demo_is_short_small_and_replaces_its_earlier_run(tmp_path):
  """The whole GRPO demo path (tiny random model, `test` preset): a few lines of output, a
  params-only checkpoint, and a second demo in the same folder starts from scratch."""
  workdir = str(tmp_path / "g")
  cmd = [sys.executable, "-m", "experiments.grpo_demo", f"--workdir={workdir}", "--model=tiny",
         "--preset=test", "--steps=1"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  for _ in range(2):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    assert len(out) == 5, out
    assert out[0].startswith("[grpo_demo] soft_gumbel reward before: ")
    assert "1 steps" in out[1] and out[2] == "checkpoint: params only: a model, not resumable"
    assert out[4] == f"TensorBoard: tensorboard --logdir {workdir}/tb"
    assert "INFO" not in res.stderr and "Traceback" not in res.stderr
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
    meta = json.load(open(os.path.join(workdir, "checkpoints", "1", "extras", "metadata")))
    assert meta["params_only"] is True
    # One metrics row: the second demo replaced the first run instead of resuming it.
    assert len(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()) == 1
