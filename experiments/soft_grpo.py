"""SofT-GRPO / GRPO training entry point: flags -> config -> `soft_grpo.learner.train`.

  python -m experiments.soft_grpo --config=experiments/configs/soft_grpo.py:cpu_small \
      --config.rollout.mode=soft_gumbel|discrete --config.model.name=smollm2-135m|<HF dir> \
      --workdir=runs/x

The same workdir resumes (see `soft_grpo.learner`). Errors in the config or the data end the
run with one line.
"""

from __future__ import annotations

import json

from absl import flags
from absl import logging as absl_logging

from experiments import cli
from soft_grpo import learner

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  cli.define_trainer_flags("soft_grpo.py", "cpu_small", "SofT-GRPO")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax logs every save at INFO
  # cli.run prints a bad config / busy workdir / changed config on resume / a bad update that
  # stops the run as one line (exit status 1).
  _, history = learner.train(FLAGS.config, FLAGS.workdir,
                             allow_config_change=FLAGS.allow_config_change)
  if history:
    print(json.dumps({k: v for k, v in history[-1].items() if not isinstance(v, dict)}))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
