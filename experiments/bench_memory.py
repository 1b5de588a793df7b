"""Peak memory per sequence and tokens/s of the LM train step (issue 15).

  python -m experiments.bench_memory --preset=paper_v1 --batch_sizes=1,4 --remats=none,dots,full \
      --attentions=ls,mhsa --steps=2

Each setting runs in its own subprocess (so peak RSS is that setting's alone): build the
trainer's model/optimizer/step exactly as experiments.train_lm does (random tokens, no data
pipeline), report XLA's compiled estimate (common.train.memory), run `--steps` steps after the
compiling one, and print the process's peak RSS and the median tokens/s. `--grad_accum` keeps
the preset's accumulation unless given. Prints a markdown table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

from experiments import cli

flags.DEFINE_string("preset", "paper_v1", "ls_lm preset (experiments/configs/ls_lm.py).")
flags.DEFINE_list("batch_sizes", ["1"], "Micro-batch sizes (config.batch_size).")
flags.DEFINE_list("remats", ["none", "dots", "full"], "config.remat values.")
flags.DEFINE_list("attentions", ["ls", "mhsa"], "config.attention values.")
flags.DEFINE_integer("grad_accum", 0, "config.grad_accum (0: the preset's).")
flags.DEFINE_integer("steps", 2, "Timed steps after the compiling one.")
flags.DEFINE_integer("vocab_size", 10_000, "Vocabulary (the presets' SentencePiece 10K).")
flags.DEFINE_boolean("run", True, "Run steps (False: compile-time estimate only).")
flags.DEFINE_string("child", "", "internal: run one setting given as JSON")
FLAGS = flags.FLAGS


def _one(setting: dict) -> dict:
  """Runs in the child process: one (attention, remat, batch) setting."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from common.train import lm_step, memory, sharding, train_state
  from experiments import train_lm
  from experiments.configs import ls_lm

  c = ls_lm.get_config(setting["preset"])
  c.update(attention=setting["attention"], remat=setting["remat"],
           batch_size=setting["batch_size"], mesh_data=1)
  if setting["grad_accum"]:
    c.grad_accum = setting["grad_accum"]
  mcfg = train_lm.model_config(c, setting["vocab_size"])
  tx, sched = train_lm.build_optimizer(c)
  mesh = sharding.make_train_mesh(1, 1)
  init = train_state.make_init_fn(mcfg, tx, c.seed)
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, min_size=c.fsdp_min_size)
  batch_sh = {k: sharding.batch_sharding(mesh, 3) for k in ("inputs", "targets")}
  step = lm_step.jit_train_step(
      lm_step.make_train_step(train_state.model_graphdef(mcfg), tx, sched, train_lm.step_config(c)),
      state_sh, batch_sh, mesh)
  shape = (c.grad_accum, c.batch_size, c.seq_len)
  spec = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k, s in batch_sh.items()}
  t0 = time.perf_counter()
  compiled = step.lower(abstract, spec).compile()
  out = {"compile_s": time.perf_counter() - t0, "xla_bytes": memory.compiled_bytes(compiled),
         "tokens_per_step": int(np.prod(shape))}
  if setting["run"]:
    state = jax.jit(init, out_shardings=state_sh)()
    rng = np.random.default_rng(0)
    times = []
    for i in range(setting["steps"] + 1):
      tok = rng.integers(0, setting["vocab_size"], shape[:2] + (c.seq_len + 1,)).astype(np.int32)
      batch = sharding.put_batch({"inputs": tok[..., :-1], "targets": tok[..., 1:]}, mesh)
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t)
      out["loss"] = float(m["loss"])
    out["step_s"] = float(np.median(times[1:])) if len(times) > 1 else times[0]
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_s"]
  out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def _run_child(setting: dict) -> dict:
  cmd = [sys.executable, "-m", "experiments.bench_memory", f"--child={json.dumps(setting)}"]
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:160]}"}
  return json.loads(lines[-1])


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(_one(json.loads(FLAGS.child))))
    return
  gb = lambda n: f"{n / 2**30:.2f}"
  print(f"preset={FLAGS.preset} grad_accum={FLAGS.grad_accum or 'preset'} vocab={FLAGS.vocab_size}"
        f" steps={FLAGS.steps} (median after the first), one subprocess per row\n")
  print("| attention | remat | micro-batch | XLA estimate GiB | peak RSS GiB | RSS GiB / seq "
        "| step s | tokens/s |")
  print("|---|---|---|---|---|---|---|---|")
  for attention in FLAGS.attentions:
    for remat in FLAGS.remats:
      for b in map(int, FLAGS.batch_sizes):
        r = _run_child(dict(preset=FLAGS.preset, attention=attention, remat=remat, batch_size=b,
                            grad_accum=FLAGS.grad_accum, steps=FLAGS.steps,
                            vocab_size=FLAGS.vocab_size, run=FLAGS.run))
        if "error" in r:
          print(f"| {attention} | {remat} | {b} | {r['error']} | | | | |", flush=True)
          continue
        rss = r["peak_rss_bytes"]
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        tok = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        per = gb(rss / b) if FLAGS.run else "-"
        print(f"| {attention} | {remat} | {b} | {gb(r['xla_bytes'])} | "
              f"{gb(rss) if FLAGS.run else '-'} | {per} | {step} | {tok} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
