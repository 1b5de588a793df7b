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
from ml_collections import config_flags

from experiments import cli
from soft_grpo import learner

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  config_flags.DEFINE_config_file("config", "experiments/configs/soft_grpo.py:cpu_small",
                                  "SofT-GRPO config file and preset.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tb).")
  flags.mark_flag_as_required("workdir")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume even though a setting that changes the math differs from the "
                    "run's stored config; the change is recorded in config_history.jsonl.")


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
