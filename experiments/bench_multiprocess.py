"""Cost of the gloo transport: train_lm step time on 1 process x 4 devices vs 2 processes x 2
devices (CPU, simulated devices), same global batch and mesh size.

  python -m experiments.bench_multiprocess [--steps=30] [--repeats=2]

Each setting runs `experiments.train_lm` (test preset, `--config.num_steps=steps`) in fresh
processes, alternating, and reads `step_s` (mean seconds per step after the first, compiling,
step) from the run's summary.json; the table shows the median over repeats and the ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_setting(processes: int, devices: int, steps: int, workdir: str) -> float:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "experiments.train_lm",
          "--config=experiments/configs/ls_lm.py:test", f"--config.num_steps={steps}",
          "--config.eval_every=100000", "--config.ckpt_every=100000",
          "--config.tensorboard=False", f"--workdir={workdir}"]
  if processes == 1:
    cmds = [base]
  else:
    address = f"127.0.0.1:{_free_port()}"
    cmds = [base + [f"--coordinator_address={address}", f"--num_processes={processes}",
                    f"--process_id={i}"] for i in range(processes)]
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for c in cmds]
  for p in procs:
    _, err = p.communicate(timeout=1800)
    if p.returncode:
      raise RuntimeError(f"train_lm failed: {err.strip().splitlines()[-1:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    return float(json.load(f)["step_s"])


def main(argv):
  del argv
  times = {(1, 4): [], (2, 2): []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(FLAGS.repeats):
      for (p, d) in times:
        times[(p, d)].append(run_setting(p, d, FLAGS.steps, os.path.join(tmp, f"{p}x{d}_{r}")))
  one, two = statistics.median(times[(1, 4)]), statistics.median(times[(2, 2)])
  print("| setting | train_lm step (s, median) | runs |\n|---|---|---|")
  print(f"| 1 process x 4 devices | {one:.4f} | {', '.join(f'{t:.4f}' for t in times[(1, 4)])} |")
  print(f"| 2 processes x 2 devices (gloo) | {two:.4f} | "
        f"{', '.join(f'{t:.4f}' for t in times[(2, 2)])} |")
  print(f"\nratio 2x2 / 1x4: {two / one:.2f}")


if __name__ == "__main__":
  flags.DEFINE_integer("steps", 30, "Training steps per run (the first is not timed).")
  flags.DEFINE_integer("repeats", 2, "Runs per setting, alternating.")
  cli.run(main)
