"""`make demo`, part 2: a short LS-attention vs MHSA language-model run (a few minutes on CPU).

Both models are the cpu_small preset (4 layers, d 128; LS: 3 local heads with window 16 and
1 global head per layer) trained on the byte-level stdlib corpus at the deliberately high
learning rate of EXPERIMENTS.md, where MHSA's attention logits grow fastest. Prints nothing
itself; returns the comparison table and the plot paths as a string.

  from experiments.ls_demo import run_ls_vs_mhsa_demo
  print(run_ls_vs_mhsa_demo("runs/demo/ls_vs_mhsa"))
"""

from __future__ import annotations

import os
import shutil

RUNS = (("mhsa", "mhsa"), ("ls", "ls"))


def demo_config(attention: str, num_steps: int = 100):
  from experiments.configs import ls_lm
  c = ls_lm.get_config("cpu_small")
  c.update(attention=attention, stabilizer="none", lr=2e-2, min_lr=2e-3, num_steps=num_steps,
           warmup_steps=10, log_every=5, eval_every=25, ckpt_every=num_steps,
           eval_batches=4, progress=True,
           # Stats on every step, as when the demo's numbers were recorded: LS-attention's
           # stats-free step fuses differently (float32 ulps), which at lr 2e-2 moves the table.
           stats_every=1)
  return c


def run_ls_vs_mhsa_demo(workdir: str, num_steps: int = 100) -> str:
  """Trains MHSA then LS for `num_steps` steps each (fresh runs under `workdir`), plots them
  and returns a Markdown comparison table plus the plot paths."""
  import ls_attention  # noqa: F401  (registers attention="ls")
  from common.train.loop import train
  from experiments import plot_runs
  dirs = []
  for name, attention in RUNS:
    run_dir = os.path.join(workdir, name)
    if os.path.isdir(run_dir):
      shutil.rmtree(run_dir)  # a demo always trains from scratch
    train(demo_config(attention, num_steps), run_dir)
    dirs.append(run_dir)
  plot_dir = os.path.join(workdir, "plots")
  paths = plot_runs.plot_runs(dirs, plot_dir)
  table = plot_runs.summary_table(dirs)
  names = ", ".join(os.path.basename(p) for p in paths)
  return (f"LS-attention vs MHSA, cpu_small, stdlib bytes, lr 2e-2, {num_steps} steps each\n"
          f"{table}\nplots in {plot_dir}: {names}")
