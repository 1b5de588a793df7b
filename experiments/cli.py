"""The one flag-parse wrapper of the entry points: `cli.run(main)` instead of `app.run(main)`.

Errors a user can make come out as ONE line on stderr, `error: ...`, with exit status 1 and no
traceback: a bad flag or --config value (unknown preset, unknown field, unparsable value, a
required flag left out) at parse time, and a ValueError / FileNotFoundError raised by `main`
(config validation, bad paths, one-line load errors, a busy workdir, a bad update that stops
the run, a step that does not fit in memory). `main` returns an exit code (or None).

Every entry point also takes `--coordinator_address`, `--num_processes` and `--process_id`:
`run` starts JAX's multi-process runtime with them (or auto-detects a TPU pod / SLURM job
without them; one machine with no flags: nothing to do) before `main` runs any JAX code.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags

def _user_errors() -> tuple[type[BaseException], ...]:
  from common.train.guard import BadUpdate
  from common.train.memory import DoesNotFit
  from common.train.workdir import WorkdirError
  return (ValueError, FileNotFoundError, WorkdirError, BadUpdate, DoesNotFit)


# What `main` may raise for bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = _user_errors()


def define_distributed_flags() -> None:
  """The multi-process flags every entry point takes (defined once)."""
  if "coordinator_address" in flags.FLAGS:
    return
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (multi-process runs; omit on one machine or "
                      "where JAX auto-detects the cluster: TPU pod, SLURM).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def define_trainer_flags(config_file: str, preset: str, what: str) -> None:
  """The flags every trainer takes: --config (default `experiments/configs/<config_file>`
  resolved against the package, so the module runs from any directory), --workdir (required)
  and --allow_config_change."""
  from ml_collections import config_flags
  try:   # with the default file, ml_collections applies --config.<field> overrides right here
    config_flags.DEFINE_config_file(
        "config", f"{os.path.join(CONFIG_DIR, config_file)}:{preset}",
        f"{what} config file and preset.", lock_config=True)
  except (AttributeError, KeyError) as e:
    print(f"error: {unknown_field_message(e, sys.argv)}", file=sys.stderr)
    sys.exit(1)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, TensorBoard); an "
                      "existing one resumes.")
  flags.mark_flag_as_required("workdir")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume even though a setting that changes the math differs from the "
                    "run's stored config; the change is recorded in config_history.jsonl.")


def quiet_logs() -> None:
  """INFO logs of absl, orbax and jax (incl. "Unable to initialize backend 'tpu'" on a CPU
  machine) are off unless --verbosity / -v asks for them; warnings and errors still show."""
  import logging
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax", "jax._src.xla_bridge"):
      logging.getLogger(name).setLevel(logging.WARNING)


def start_distributed() -> None:
  """jax.distributed from the flags (or cluster auto-detection); before any JAX computation."""
  from common import distributed
  f = flags.FLAGS
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address=f.coordinator_address, num_processes=f.num_processes,
      process_id=f.process_id))


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, but a bad flag or --config is one line and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    last = re.sub(r"^(ValueError|KeyError|FileNotFoundError): ", "", lines[-1]) if lines else ""
    print(f"error: {last or type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown field>
    print(f"error: {unknown_field_message(e, argv)}", file=sys.stderr)
    sys.exit(1)


def unknown_field_message(e: BaseException, argv: Sequence[str]) -> str:
  """ml_collections' KeyError/AttributeError for `--config.<path>=...` naming a field the
  config lacks (its text is a repr, sometimes with a "Did you mean" line) -> one readable line
  with the whole dotted path as the user typed it."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text.splitlines()[0] if text else "")
  leaf = names[0] if names else "?"
  path = f"config.{leaf}"
  for arg in argv:   # the flag the user wrote, e.g. --config.rollout.mdoe=x
    m = re.match(r"--(config(?:\.[A-Za-z0-9_]+)+)", arg)
    if m and m.group(1).split(".")[-1] == leaf:
      path = m.group(1)
      break
  hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
  return (f"{path}: unknown field" + (f'; did you mean "{hint.group(1)}"?' if hint else "")
          + "; allowed: the fields of the config file")


def call_main(main: Callable[[list[str]], int | None], argv: list[str], *,
              errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
  """Runs `main(argv)`; a user error or an out-of-memory error becomes one `error:` line on
  stderr and exit code 1; anything else is a bug and keeps its traceback."""
  try:
    code = main(argv)
  except errors as e:
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 1
  except Exception as e:  # an out-of-memory the memory check did not foresee: one line
    from common.train.memory import oom_message
    line = oom_message(e)
    if line is None:
      raise
    print(f"error: {line}", file=sys.stderr)
    return 1
  return code or 0


def run(main: Callable[[list[str]], int | None], *,
        errors: tuple[type[BaseException], ...] = USER_ERRORS,
        positional: bool = False) -> None:
  """`app.run(main)` with one-line errors (see the module docstring)."""

  def wrapped(argv):
    quiet_logs()
    if len(argv) > 1 and not positional:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(1)
    sys.exit(call_main(lambda a: (start_distributed(), main(a))[1], argv, errors=errors))

  define_distributed_flags()
  app.run(wrapped, flags_parser=parse_flags)
