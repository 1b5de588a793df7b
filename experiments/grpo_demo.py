"""A short SofT-GRPO run on SmolLM2-135M that prints the reward before and after (make demo).

  python -m experiments.grpo_demo [--workdir=runs/grpo_demo] [--steps=3]

`run_grpo_demo(workdir)` is what `experiments/demo.py` calls: the cpu_small preset in
soft_gumbel mode for a few steps; the reward is the mean over n samples of a fixed set of
held-out problems (same seed before and after), so the two numbers are comparable. A few
steps of RL on a 135M model move this number little and noisily: it is a smoke test of the
whole pipeline (rollout, math-verify rewards, scoring, updates, checkpoint), not a result.

The demo saves params-only checkpoints (`run.checkpoint_params_only`): the run folder is a
model (`experiments.generate --model=<workdir>`, `experiments.export`), 0.46 GB for SmolLM2
instead of 1.8 GB with the AdamW moments and the reference policy, but it cannot be
resumed (a resume refuses with one line). Not bfloat16: for 92% of SmolLM2's weights, three
Adam steps at lr 2e-5 (about 6e-5) are under half a bfloat16 spacing, so they would round away. A demo always
trains from scratch: an earlier demo run in the workdir is replaced; any other non-empty
folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
from absl import flags

from experiments import cli

from experiments.configs.soft_grpo import get_config
from soft_grpo import learner

# What the demo's checkpoints are, for its output and docs.
CHECKPOINT_NOTE = "params only: a model, not resumable"


def fresh_workdir(workdir: str) -> None:
  """Removes an earlier demo run (params-only checkpoints: nothing resumable is lost); refuses
  a non-empty folder that is not one, so a mistyped --workdir never deletes a real run."""
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      earlier_demo = json.load(f)["config"]["run"].get("checkpoint_params_only") is True
  except (OSError, ValueError, KeyError, TypeError):
    earlier_demo = False
  if not earlier_demo:
    raise ValueError(f"--workdir {workdir}: not empty and not an earlier demo run "
                     f"(run.checkpoint_params_only); allowed: an empty or new folder")
  shutil.rmtree(workdir)


def run_grpo_demo(workdir: str, *, steps: int = 3, num_problems: int = 8, n: int = 4,
                  mode: str = "soft_gumbel", model: str = "smollm2-135m",
                  preset: str = "cpu_small") -> str:
  c = get_config(preset)
  c.rollout.mode, c.model.name, c.run.num_steps = mode, model, steps
  c.run.checkpoint_every = max(steps, 1)
  c.run.checkpoint_params_only = True    # the demo's folder is a model, 1/4 of the bytes
  fresh_workdir(workdir)
  t0 = time.perf_counter()
  run = learner.build(c)
  problems = run.test_set[:num_problems]
  try:
    before = float(run.learner.evaluate(run.params, problems, n, jax.random.key(1234)).mean())
    print(f"[grpo_demo] {mode} reward before: {before:.3f} "
          f"({len(problems)} held-out problems x {n} samples)", flush=True)
    state, history = learner.train(c, workdir)
    after = float(run.learner.evaluate(state.params, problems, n, jax.random.key(1234)).mean())
  finally:
    run.learner.reward_fn.close()
  train_rewards = ", ".join(f"{h['reward_mean']:.3f}" for h in history)
  summary = (f"SofT-GRPO demo ({mode}, {model}, {int(state.step)} steps, "
             f"{time.perf_counter() - t0:.0f}s): held-out reward before {before:.3f} -> "
             f"after {after:.3f}; per-step train reward [{train_rewards}]\n"
             f"checkpoint: {CHECKPOINT_NOTE}")
  return summary   # the caller prints it (once: make demo printed it twice before)


FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  flags.DEFINE_string("workdir", "runs/grpo_demo", "Run directory (an earlier demo run in it "
                      "is replaced).")
  flags.DEFINE_integer("steps", 3, "Training steps.")
  flags.DEFINE_string("mode", "soft_gumbel", "Rollout mode.")
  flags.DEFINE_string("model", "smollm2-135m", "Model name or HF dir ('tiny' for a smoke test).")
  flags.DEFINE_string("preset", "cpu_small", "Config preset.")


def main(argv):
  del argv
  print(run_grpo_demo(FLAGS.workdir, steps=FLAGS.steps, mode=FLAGS.mode, model=FLAGS.model,
                      preset=FLAGS.preset))
  root = os.path.abspath(FLAGS.workdir)
  print(f"results: {root} (metrics.jsonl, checkpoints/)\n"
        f"TensorBoard: tensorboard --logdir {root}/tb")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
