"""Peak memory and tokens/s of the LM train step, per (attention, remat, micro-batch) (issues 13, 15).

  python -m experiments.bench_memory --preset=paper_v1 --batch_sizes=1,4 --remats=none,dots,full \
      --attentions=ls,mhsa --steps=3 [--seq_len=8192] [--grad_accum=1] [--out=rows.json]

Each setting runs in its own subprocess (so its peak RSS is that setting's alone). The child
builds the step with `common.train.lm_setup.build`, the same call `common.train.loop.train`
makes (config -> model, optimizer, mesh, state shardings, the jitted step: the loop's
non-logging step, `collect_stats=False`; `--stats`: its logging step, which its memory check
compiles); batches go through `sharding.put_batch`.
Only the data differ: random tokens instead of the grain pipeline. It reports XLA's compiled
estimate (`common.train.memory.compiled_bytes`, what the trainer's pre-step check uses), then
runs one step with the compiled executable and `--steps` more, and prints the process's peak
RSS and the median tokens/s of the `--steps` timed ones. Prints a markdown table.

`--seq_len` (0: the preset's) changes `seq_len`; learned positions grow to cover it
(`max_position_embeddings = max(preset's, seq_len)`). `--grad_accum` (0: the preset's) changes
the accumulation; memory does not depend on it (micro-batches are scanned), time per step is
proportional to it, tokens/s is not. `--timeout_s` stops a child that runs too long (its row
says so).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

from absl import flags

from experiments import cli

flags.DEFINE_string("preset", "paper_v1", "ls_lm preset (experiments/configs/ls_lm.py).")
flags.DEFINE_list("batch_sizes", ["1"], "Micro-batch sizes (config.batch_size).")
flags.DEFINE_list("remats", ["none", "dots", "full"], "config.remat values.")
flags.DEFINE_list("attentions", ["ls", "mhsa"], "config.attention values.")
flags.DEFINE_integer("seq_len", 0, "config.seq_len (0: the preset's).")
flags.DEFINE_integer("grad_accum", 0, "config.grad_accum (0: the preset's).")
flags.DEFINE_integer("steps", 3, "Timed steps after the first run of the compiled step.")
flags.DEFINE_integer("vocab_size", 10_000, "Vocabulary (the presets' SentencePiece 10K).")
flags.DEFINE_boolean("run", True, "Run steps (False: compile-time estimate only).")
flags.DEFINE_boolean("stats", False, "Time the loop's logging step (with the attention-stats "
                     "pass, what its memory check compiles) instead of the plain one.")
flags.DEFINE_integer("timeout_s", 0, "Seconds one setting may take (0: no limit).")
flags.DEFINE_string("out", "", "Optional JSON file with every row's numbers.")
flags.DEFINE_string("child", "", "internal: run one setting given as JSON")
FLAGS = flags.FLAGS

_LOG = "[bench_memory]"   # the child's progress lines; the parent forwards them to stderr


def config_for(setting: dict):
  """The ls_lm ConfigDict of one setting: the preset with the benchmark's overrides."""
  from experiments.configs import ls_lm
  c = ls_lm.get_config(setting["preset"])
  c.update(attention=setting["attention"], remat=setting["remat"],
           batch_size=setting["batch_size"], progress=False, tensorboard=False)
  if setting.get("seq_len"):
    c.seq_len = setting["seq_len"]
    c.max_position_embeddings = max(c.max_position_embeddings, c.seq_len)
  if setting.get("grad_accum"):
    c.grad_accum = setting["grad_accum"]
  return c


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def _one(setting: dict) -> dict:
  """Runs in the child process: one (attention, remat, micro-batch) setting."""
  import jax
  import numpy as np

  import ls_attention  # noqa: F401  (registers attention="ls", as the entry points do)
  from common import sharding
  from common.train import lm_setup, memory
  from common.train.lm_config import LMConfig

  log = lambda msg: print(f"{_LOG} {msg}", file=sys.stderr, flush=True)
  c = LMConfig.from_config_dict(config_for(setting))
  setup = lm_setup.build(c, setting["vocab_size"])   # the trainer's own wiring
  mesh = setup.mesh
  step = setup.train_step(collect_stats=setting.get("stats", False))
  d = c.data
  shape_AxBxT = (d.grad_accum, d.batch_size, d.seq_len)
  abstract, spec = setup.abstract_state, setup.batch_spec()
  t0 = time.perf_counter()
  compiled = step.lower(abstract, spec).compile()
  out = {"compile_s": time.perf_counter() - t0, "xla_bytes": memory.compiled_bytes(compiled),
         "tokens_per_step": int(np.prod(shape_AxBxT)), "seq_len": d.seq_len,
         "grad_accum": d.grad_accum, "devices": mesh.size}
  log(f"{setting['attention']} remat={setting['remat']} B={d.batch_size} T={d.seq_len} "
      f"A={d.grad_accum}: compiled in {out['compile_s']:.1f} s, XLA estimate "
      f"{out['xla_bytes'] / 2**30:.2f} GiB")
  if setting["run"]:
    state = setup.init_state()
    rng = np.random.default_rng(0)
    times = []
    for i in range(setting["steps"] + 1):
      tok_AxBxT1 = rng.integers(0, setting["vocab_size"], shape_AxBxT[:2] + (d.seq_len + 1,),
                                dtype=np.int32)
      batch = sharding.put_batch({"inputs": tok_AxBxT1[..., :-1], "targets": tok_AxBxT1[..., 1:]},
                                 mesh, leading=1)
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t)
      out["loss"] = float(m["loss"])
      log(f"  step {i}{' (first run, not timed)' if i == 0 and setting['steps'] else ''}: "
          f"{times[-1]:.2f} s, loss {out['loss']:.3f}")
    out["step_times_s"] = times
    timed = times[1:] or times
    out["step_s"] = float(statistics.median(timed))
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_s"]
  out["peak_rss_bytes"] = _peak_rss_bytes()
  return out


def _run_child(setting: dict, timeout_s: float) -> dict:
  """One setting in a fresh process; its progress lines are forwarded to our stderr."""
  cmd = [sys.executable, "-m", "experiments.bench_memory", f"--child={json.dumps(setting)}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ,
                                   JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
  tail: list[str] = []
  stdout: list[str] = []

  def pump_stderr():
    for line in proc.stderr:
      if line.startswith(_LOG):
        print(line.rstrip(), file=sys.stderr, flush=True)
      elif line.strip():
        tail[:] = [line.strip()]

  readers = [threading.Thread(target=pump_stderr, daemon=True),
             threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
  for r in readers:
    r.start()
  try:
    proc.wait(timeout=timeout_s or None)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return {"error": f"stopped after {timeout_s:g} s (--timeout_s)"}
  for r in readers:
    r.join(timeout=5)
  lines = [ln for ln in stdout if ln.startswith("{")]
  if proc.returncode or not lines:
    return {"error": f"exit {proc.returncode}: {(tail or ['?'])[-1][:160]}"}
  return json.loads(lines[-1])


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(_one(json.loads(FLAGS.child))))
    return
  gb = lambda n: f"{n / 2**30:.2f}"
  print(f"preset={FLAGS.preset} seq_len={FLAGS.seq_len or 'preset'} "
        f"grad_accum={FLAGS.grad_accum or 'preset'} vocab={FLAGS.vocab_size} "
        f"step={'with' if FLAGS.stats else 'without'} attention stats "
        f"steps={FLAGS.steps} (median of the steps after the first run), one subprocess per row\n")
  print("| attention | remat | micro-batch | seq | XLA estimate GiB | peak RSS GiB | RSS GiB / seq "
        "| step s | tokens/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for attention in FLAGS.attentions:
    for remat in FLAGS.remats:
      for b in map(int, FLAGS.batch_sizes):
        setting = dict(preset=FLAGS.preset, attention=attention, remat=remat, batch_size=b,
                       seq_len=FLAGS.seq_len, grad_accum=FLAGS.grad_accum, steps=FLAGS.steps,
                       vocab_size=FLAGS.vocab_size, run=FLAGS.run, stats=FLAGS.stats)
        r = _run_child(setting, FLAGS.timeout_s)
        rows.append(dict(setting, **r))
        seq = FLAGS.seq_len or "preset"
        if "error" in r:
          print(f"| {attention} | {remat} | {b} | {seq} | {r['error']} | | | | |", flush=True)
          continue
        rss = r["peak_rss_bytes"]
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        tok = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        per = gb(rss / b) if FLAGS.run else "-"
        print(f"| {attention} | {remat} | {b} | {r['seq_len']} | {gb(r['xla_bytes'])} | "
              f"{gb(rss) if FLAGS.run else '-'} | {per} | {step} | {tok} |", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
