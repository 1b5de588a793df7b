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

import jax
from absl import app, flags

from experiments import soft_grpo as sg
from soft_grpo.pass_at_k import summarize

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
  flags.DEFINE_multi_string("set", [], "Extra config overrides, field=value (e.g. max_new_tokens=64).")


def parse_ks(text: str, n: int) -> list[int]:
  try:
    ks = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--k={text!r} must be comma-separated ints") from None
  if not ks or any(k < 1 or k > n for k in ks):
    raise ValueError(f"--k={text!r}: every k must be in [1, n={n}]")
  return ks


def markdown_table(res: dict, title: str) -> str:
  ks = sorted(res["pass@k"], key=int)
  head = "| estimator | " + " | ".join(f"Pass@{k}" for k in ks) + " |"
  sep = "|---|" + "---|" * len(ks)
  unb = "| unbiased | " + " | ".join(f"{100 * res['pass@k'][k]:.1f}" for k in ks) + " |"
  mx = "| max over first k | " + " | ".join(
      f"{100 * res['max_first_k'][k]:.1f}" for k in ks) + " |"
  return (f"### {title}\n\nmean@{res['n']} (paper's Pass@1): {100 * res['mean@n']:.1f}% over "
          f"{res['num_problems']} problems\n\n{head}\n{sep}\n{unb}\n{mx}\n")


def run_eval(model: str, mode: str, n: int, ks: list[int], num_problems: int, *,
             preset: str = "cpu_small", tau: float = 0.5, seed: int = 0,
             rows_per_call: int = 64, overrides: dict | None = None) -> dict:
  from experiments.configs.soft_grpo import get_config
  c = get_config(preset)
  c.model, c.mode, c.seed = model, mode, seed
  c.eval_tau = tau             # `Trainer.evaluate` samples soft modes at eval_tau
  for key, value in (overrides or {}).items():
    if key not in c:
      raise ValueError(f"--set {key}: unknown config field")
    c[key] = type(c[key])(value) if not isinstance(c[key], tuple) else value
  if n < 1:
    raise ValueError(f"--n must be >= 1, got {n}")
  trainer, params, test_set, _, _ = sg.build(c)
  if num_problems < 1 or num_problems > len(test_set):
    raise ValueError(f"--num_problems must be in [1, {len(test_set)}], got {num_problems}")
  t0 = time.perf_counter()
  try:
    sub = sg.Trainer(trainer.graphdef, trainer.cfg, trainer.tokenizer, test_set,
                     trainer.reward_fn, mesh=trainer.mesh, prompt_fn=trainer.prompt_fn)
    correct = sub.evaluate(params, list(range(num_problems)), n, jax.random.key(seed),
                           rows_per_call=rows_per_call)
  finally:
    getattr(trainer.reward_fn, "close", lambda: None)()
  res = summarize(correct, ks)
  res.update(model=model, mode=mode, tau=c.eval_tau if mode != "discrete" else None, preset=preset,
             seed=seed, seconds=time.perf_counter() - t0,
             correct_counts=[int(x) for x in correct.sum(axis=1)])
  return res


def main(argv):
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
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
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=2)
    with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
      f.write(table)


if __name__ == "__main__":
  define_flags()
  app.run(main)
