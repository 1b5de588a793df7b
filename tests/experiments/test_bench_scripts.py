"""Smoke test of every benchmark script at its smallest setting, so a rename breaks CI.

Each `experiments/bench_*.py` runs as a user runs it (`python -m ...` with its flags, in a fresh
process) on tiny shapes or the `test` preset; the test checks the exit status and that the
table it prints (or its JSON) holds measured numbers. It says nothing about speed. Scripts that
need torch / transformers (the `test` / `bench` extras) are skipped without them.
`benchmarks/accelerator_check.py` is run in-process with its head counts shrunk: its own
`--smoke` takes minutes in Pallas interpret mode. Seen on the shared 2-core box: 13-53 s per
script, about 4 minutes for the file; the three over 35 s are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], timeout: float = 300, devices: int | None = None) -> str:
  """`python -m <args>` from the repository root; returns stdout, fails with stderr's tail."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
  assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{tail}"
  return proc.stdout


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
  return [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
          if ln.startswith(f"| {first_cell}")]


def test_bench_memory(tmp_path):
  out = tmp_path / "rows.json"
  stdout = _run(["experiments.bench_memory", "--preset=test", "--attentions=ls,mhsa",
                 "--remats=none", "--batch_sizes=2", "--seq_len=32", "--vocab_size=64",
                 "--steps=1", "--timeout_s=240", f"--out={out}"])
  rows = json.loads(out.read_text())
  assert [r["attention"] for r in rows] == ["ls", "mhsa"]
  for r in rows:
    assert "error" not in r, r
    assert r["seq_len"] == 32 and r["tokens_per_step"] == r["grad_accum"] * 2 * 32
    assert r["xla_bytes"] > 0 and r["peak_rss_bytes"] > r["xla_bytes"]
    assert len(r["step_times_s"]) == 2 and r["tokens_per_s"] > 0
    assert math.isfinite(r["loss"])
  assert len(_table_rows(stdout, "ls")) == 1 and len(_table_rows(stdout, "mhsa")) == 1


def test_bench_attention(tmp_path):
  out = tmp_path / "attn.md"
  _run(["experiments.bench_attention", "--seq_lens=32", "--repeats=1", "--num_heads=2",
        "--num_local_heads=1", "--window=4", "--head_dim=8", f"--out={out}"])
  (row,) = _table_rows(out.read_text(), "32")
  assert len(row) == 12   # T, 3 x (LS, MHSA, ratio), FLOP bound, KV ratio
  # Times print with 3 decimals (0.000 at this size); every cell must be a measured number.
  assert all(math.isfinite(float(x)) and float(x) >= 0 for x in row)


@pytest.mark.slow
def test_bench_multiprocess():
  stdout = _run(["experiments.bench_multiprocess", "--steps=2", "--repeats=1"], timeout=400)
  assert float(_table_rows(stdout, "1 process")[0][1]) > 0
  assert float(_table_rows(stdout, "2 processes")[0][1]) > 0


def test_bench_grpo_step_ours_only(tmp_path):
  out = tmp_path / "grpo.json"
  stdout = _run(["experiments.bench_grpo_step", "--preset=test", "--modes=discrete", "--notrl",
                 "--steps=2", "--warmup=1", f"--out={out}"])
  times = json.loads(out.read_text())["ours"]["discrete"]
  assert len(times) == 2 and all(t["total"] > 0 for t in times)
  assert _table_rows(stdout, "total")


def test_bench_rollout(tiny_hf_checkpoints, tmp_path):
  out = tmp_path / "rollout.json"
  _run(["experiments.bench_rollout", f"--model={tiny_hf_checkpoints['llama'].path}",
        "--batch=2", "--tokens=24", "--repeats=1", "--notrain_step", "--per_step",
        f"--out={out}"])
  res = json.loads(out.read_text())
  assert res["discrete_s"] > 0 and res["soft_gumbel_s"] > 0
  assert all(math.isfinite(res[k]) for k in ("sampler_step_s", "discrete_vs_sampler"))


@pytest.mark.slow
def test_bench_decode():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  stdout = _run(["experiments.bench_decode", "--batch=1", "--new_tokens=2", "--repeats=1"])
  assert len(_table_rows(stdout, "ours")) == 1 and len(_table_rows(stdout, "HF")) == 1


@pytest.mark.slow
def test_accelerator_check_small(monkeypatch, tmp_path):
  """Its correctness pass and speed sweep, on 4 heads (3 local) at T 32 / 64, interpret mode."""
  spec = importlib.util.spec_from_file_location(
      "accelerator_check", os.path.join(ROOT, "benchmarks", "accelerator_check.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  monkeypatch.setattr(mod, "NUM_HEADS", 4)
  monkeypatch.setattr(mod, "NUM_LOCAL", 3)
  monkeypatch.setattr(mod, "WINDOW", 8)
  log = lambda s: None  # noqa: E731
  corr_rows, ok = mod.check_correctness("pallas", True, 32, log)
  assert ok and len(corr_rows) == 8
  args = types.SimpleNamespace(seq_lens=[64], check_len=32, max_xla_len=64, repeats=1,
                               budget_s=1e9, smoke=True)
  speed_rows, skipped = mod.run_speed(args, "cpu", "pallas", True, log, time.perf_counter())
  assert not skipped and len(speed_rows) == 4
  for row in speed_rows:
    for name in ("ls", "local", "xla_c"):
      med, _, err = row[name]
      assert err is None and med > 0, (name, err)
  text = mod.report(args, "cpu", corr_rows, ok, speed_rows, skipped, None, 1.0)
  assert "PASS" in text
