"""LS-attention / MHSA language-model trainer (issue 4): flags -> config -> `train`.

  python -m experiments.train_lm --config=experiments/configs/ls_lm.py:cpu_small \
      --config.attention=ls --config.stabilizer=none --workdir=runs/x

The loop is `common.train.loop.train(config, workdir)` (checkpoints, resume, metrics: see
there); the config is validated once by `common.train.lm_config.LMConfig`.
"""

from __future__ import annotations

import json
import logging

from absl import flags

import ls_attention  # noqa: F401  (registers attention="ls")
from common.train.loop import train
from experiments import cli

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so importing this module (e.g. from the
  demo) never collides with other modules' flags."""
  cli.define_trainer_flags("ls_lm.py", "cpu_small", "ls_lm")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  print(json.dumps(train(FLAGS.config, FLAGS.workdir,
                         allow_config_change=FLAGS.allow_config_change)))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
