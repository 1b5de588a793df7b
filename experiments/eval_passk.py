"""Pass@k evaluation of a policy on the held-out task split (issue 5 "Evaluation").

  python -m experiments.eval_passk --model=smollm2-135m --mode=soft_gumbel --n=32 \
      --k=1,2,4,8,16,32 --num_problems=16 --out=runs/eval.json

Rollout settings (budget, top-k/p, temperature, task, answer format) come from a SofT-GRPO
config preset (--preset, default cpu_small); `--tau` defaults to 0.5, the official
soft-thinking inference value (training uses 0.1). Reports the unbiased Pass@k
(1 - C(n-c, k)/C(n, k)), the official "max over the first k samples", and mean@n (the
paper's "Pass@1"); writes JSON (--out) and a markdown table (--out with .md).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from experiments import cli

from experiments.configs.soft_grpo import get_config
from soft_grpo import learner
from soft_grpo.modes import get_mode
from soft_grpo.pass_at_k import markdown_table, parse_ks, summarize

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  flags.DEFINE_string("model", "smollm2-135m", "Embedded name, HF checkpoint dir, or 'tiny'.")
  flags.DEFINE_string("mode", "soft_gumbel", "discrete | soft | soft_gumbel | ...")
  flags.DEFINE_integer("n", 32, "Samples per problem.")
  flags.DEFINE_string("k", "1,2,4,8,16,32", "Comma-separated k values (each <= n).")
  flags.DEFINE_integer("num_problems", 16, "Test problems (from the start of the test split).")
  flags.DEFINE_string("out", None, "JSON output path (a .md table is written beside it).")
  flags.DEFINE_string("preset", "cpu_small", "experiments/configs/soft_grpo.py preset.")
  flags.DEFINE_float("tau", 0.5, "Gumbel-softmax temperature for soft modes.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the samples.")
  flags.DEFINE_integer("rows_per_call", 64, "Rollout rows per jitted call (rounded to n).")
  flags.DEFINE_multi_string("set", [], "Extra config overrides, section.field=value "
                            "(e.g. rollout.max_new_tokens=64).")


def eval_config(model: str, mode: str, *, preset: str = "cpu_small", tau: float = 0.5,
                seed: int = 0, overrides: dict | None = None):
  """The preset with the policy, rollout mode, evaluation tau and `--set` overrides."""
  c = get_config(preset)
  c.model.name, c.rollout.mode, c.seed = model, mode, seed
  c.run.eval_tau = tau             # evaluations sample soft modes at run.eval_tau
  for key, value in (overrides or {}).items():
    section, _, field = key.rpartition(".")
    if section not in c or field not in c[section]:
      raise ValueError(f"--set {key}: unknown config field; allowed: section.field")
    old = c[section][field]
    try:
      c[section][field] = value if isinstance(old, (tuple, str)) else type(old)(value)
    except ValueError:
      raise ValueError(f"--set {key}={value!r}: not a {type(old).__name__}") from None
  return c


def run_eval(model: str, mode: str, n: int, ks: list[int], num_problems: int, *,
             preset: str = "cpu_small", tau: float = 0.5, seed: int = 0,
             rows_per_call: int = 64, overrides: dict | None = None) -> dict:
  c = eval_config(model, mode, preset=preset, tau=tau, seed=seed, overrides=overrides)
  t0 = time.perf_counter()
  correct = learner.evaluate(c, n, num_problems, seed=seed, rows_per_call=rows_per_call)
  res = summarize(correct, ks)
  res.update(model=model, mode=mode, tau=c.run.eval_tau if get_mode(mode).soft else None,
             preset=preset, seed=seed, seconds=time.perf_counter() - t0,
             correct_counts=[int(x) for x in correct.sum(axis=1)],
             correct=[[int(x) for x in row] for row in correct])   # [problem][sample] 0/1
  return res


def _prepare_out(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {path}: cannot create its folder ({e.strerror})") from None
  if os.path.isdir(path):
    raise ValueError(f"--out {path}: is a folder; allowed: a .json file path")
  if not os.access(parent, os.W_OK):
    raise ValueError(f"--out {path}: folder {parent} is not writable")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    if FLAGS.out:   # before the (long) evaluation, so a bad path loses no results
      _prepare_out(FLAGS.out)
    ks = parse_ks(FLAGS.k, FLAGS.n)
    overrides = dict(s.split("=", 1) for s in FLAGS.set)
    res = run_eval(FLAGS.model, FLAGS.mode, FLAGS.n, ks, FLAGS.num_problems,
                   preset=FLAGS.preset, tau=FLAGS.tau, seed=FLAGS.seed,
                   rows_per_call=FLAGS.rows_per_call, overrides=overrides)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")
  table = markdown_table(res, f"{FLAGS.model} / {FLAGS.mode}")
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=2)
    with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
      f.write(table)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
