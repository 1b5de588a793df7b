"""LS-attention / MHSA language-model trainer (issue 4): flags -> config -> `train`.

  python -m experiments.train_lm --config=experiments/configs/ls_lm.py:cpu_small \
      --config.attention=ls --config.stabilizer=none --workdir=runs/x

The loop is `common.train.loop.train(config, workdir)` (checkpoints, resume, metrics: see
there); the config is validated once by `common.train.lm_config.LMConfig`.
"""

from __future__ import annotations

import json
import logging
import os

from absl import flags
from ml_collections import config_flags

import ls_attention  # noqa: F401  (registers attention="ls")
from common.train.loop import train
from experiments import cli

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so importing this module (e.g. from the
  demo) never collides with other modules' flags."""
  # Resolved against the package, so the module runs from any directory.
  default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ls_lm.py")
  config_flags.DEFINE_config_file(
      "config", f"{default}:cpu_small", "ls_lm config file and preset.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); resumes if present.")
  flags.mark_flag_as_required("workdir")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume even though a setting that changes the math differs from the "
                    "run's stored config; the change is recorded in config_history.jsonl.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  print(json.dumps(train(FLAGS.config, FLAGS.workdir,
                         allow_config_change=FLAGS.allow_config_change)))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
