"""A short SofT-GRPO run on SmolLM2-135M that prints the reward before and after (make demo).

  python -m experiments.grpo_demo [--workdir=runs/grpo_demo] [--steps=3]

`run_grpo_demo(workdir)` is what `experiments/demo.py` calls: the cpu_small preset in
soft_gumbel mode for a few steps; the reward is the mean over n samples of a fixed set of
held-out problems (same seed before and after), so the two numbers are comparable. A few
steps of RL on a 135M model move this number little and noisily: it is a smoke test of the
whole pipeline (rollout, math-verify rewards, scoring, updates, checkpoint), not a result.
"""

from __future__ import annotations

import sys
import time

import jax
from absl import app, flags


def run_grpo_demo(workdir: str, *, steps: int = 3, num_problems: int = 8, n: int = 4,
                  mode: str = "soft_gumbel", model: str = "smollm2-135m",
                  preset: str = "cpu_small") -> str:
  from experiments import soft_grpo as sg
  from experiments.configs.soft_grpo import get_config
  from soft_grpo.trainer import Trainer

  c = get_config(preset)
  c.mode, c.model, c.num_steps = mode, model, steps
  c.checkpoint_every = max(steps, 1)
  t0 = time.perf_counter()
  trainer, params, test_set, _, _ = sg.build(c)
  evaluator = Trainer(trainer.graphdef, trainer.cfg, trainer.tokenizer, test_set[:num_problems],
                      trainer.reward_fn, mesh=trainer.mesh, prompt_fn=trainer.prompt_fn)
  idx = list(range(min(num_problems, len(test_set))))
  try:
    before = float(evaluator.evaluate(params, idx, n, jax.random.key(1234)).mean())
    print(f"[grpo_demo] {mode} reward before: {before:.3f} "
          f"({len(idx)} held-out problems x {n} samples)", flush=True)
    state, history = sg.train(c, workdir)
    after = float(evaluator.evaluate(state.params, idx, n, jax.random.key(1234)).mean())
  finally:
    getattr(trainer.reward_fn, "close", lambda: None)()
  train_rewards = ", ".join(f"{h['reward_mean']:.3f}" for h in history)
  summary = (f"SofT-GRPO demo ({mode}, {model}, {int(state.step)} steps, "
             f"{time.perf_counter() - t0:.0f}s): held-out reward before {before:.3f} -> "
             f"after {after:.3f}; per-step train reward [{train_rewards}]")
  print(summary, flush=True)
  return summary


FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  flags.DEFINE_string("workdir", "runs/grpo_demo", "Run directory.")
  flags.DEFINE_integer("steps", 3, "Training steps.")
  flags.DEFINE_string("mode", "soft_gumbel", "Rollout mode.")
  flags.DEFINE_string("model", "smollm2-135m", "Model name or HF dir ('tiny' for a smoke test).")
  flags.DEFINE_string("preset", "cpu_small", "Config preset.")


def main(argv):
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    run_grpo_demo(FLAGS.workdir, steps=FLAGS.steps, mode=FLAGS.mode, model=FLAGS.model,
                  preset=FLAGS.preset)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
