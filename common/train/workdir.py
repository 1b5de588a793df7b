"""A run's folder: one writer at a time (a lock), and a config that cannot change silently.

`WorkdirLock` holds an exclusive `fcntl.flock` on `<workdir>/.lock` for the life of the run and
writes its holder (host, pid, start time) into the file. The kernel releases a flock when its
process dies, even on SIGKILL, so a lock left by a killed run is never "stale" in a way that
blocks: the next run takes it over and says whose it was. A second live run is refused at once
with one line naming the holder.

`check_config_on_resume` compares a resumed run's config with the one stored at its start
(`config.json`, never overwritten). Fields that change the math (learning rate, seed, model,
data, batch, schedule, ...) are refused with one line naming each field and its old/new value,
unless the caller allows it; then the change is appended to `config_history.jsonl` with the step
it took effect. Fields that only change bookkeeping (how often to log, how many steps in total)
may change freely and are recorded too.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterable, Mapping

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
HISTORY_NAME = "config_history.jsonl"

# Fields whose change does not alter the math of the steps already taken or to come (how often
# to log or save, how the same computation is laid out on devices or in memory). num_steps is
# NOT one: it sets the length of the LR schedule.
BOOKKEEPING_FIELDS = frozenset({
    "log_every", "eval_every", "ckpt_every", "stats_every", "keep_checkpoints",
    "async_checkpoint", "progress", "tensorboard", "eval_problems", "eval_n", "export",
    "verbosity", "plots", "memory_check", "memory_limit_gb", "remat", "loss_chunk_tokens",
    "attention_impl", "mesh_data", "mesh_fsdp", "mesh_tensor", "fsdp_min_size", "data_workers",
})


class WorkdirError(RuntimeError):
  """A one-line error about the run folder (busy, not a folder, not writable, ...)."""


def _process_start_time(pid: int) -> str | None:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]   # field 22: starttime in clock ticks
  except (OSError, IndexError):
    return None


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` (and parents); one-line errors if it is a file or not writable."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir}: exists and is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir}: not writable by this user")
  return path


class WorkdirLock:
  """Exclusive lock on a run folder; use as a context manager or acquire()/release()."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None
    self.previous_holder: dict | None = None   # the dead run we took over from, if any

  def _read_holder(self, fd: int) -> dict | None:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      raw = os.read(fd, 4096)
      return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
      return None

  def acquire(self) -> "WorkdirLock":
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir {self.workdir}: cannot create its lock file "
                         f"({e.strerror})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_holder(fd) or {}
      os.close(fd)
      who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
             f"{holder.get('started', '?')}")
      raise WorkdirError(f"--workdir {self.workdir} is in use by another run ({who}); wait "
                         "for it to finish or use another workdir") from None
    self.previous_holder = self._read_holder(fd)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "pid_start_ticks": _process_start_time(os.getpid())}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  @property
  def took_over_stale(self) -> bool:
    return bool(self.previous_holder)

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _normalize(config: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(dict(config), default=str))


def effective_config(workdir: str) -> dict[str, Any] | None:
  """The stored config with every recorded change applied (None for a new run)."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  config = _flatten(stored.get("config", stored))
  hist = os.path.join(workdir, HISTORY_NAME)
  if os.path.exists(hist):
    with open(hist) as f:
      for line in f:
        if line.strip():
          for k, (_, new) in json.loads(line)["changes"].items():
            config[k] = new
  return config


def check_config_on_resume(workdir: str, config: Mapping[str, Any], *, step: int,
                           allow_change: bool, extra: Mapping[str, Any] | None = None,
                           bookkeeping: Iterable[str] = BOOKKEEPING_FIELDS,
                           write: bool = True) -> dict:
  """Writes `config.json` for a new run; for a resumed one, compares and records changes.

  `extra` (e.g. the resolved model config) is stored beside the config at the start. Returns
  {field: (old, new)} of the accepted changes. Raises ValueError (one line) for a change to a
  math field unless `allow_change`. write=False (processes other than 0) only compares.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  new = _normalize(config)
  old = effective_config(workdir)
  if old is None:
    if not write:
      return {}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"config": new, **(_normalize(extra or {}))}, f, indent=1)
    os.replace(tmp, path)
    return {}
  fo, fn = old, _flatten(new)
  changes = {k: (fo.get(k), fn.get(k)) for k in sorted(set(fo) | set(fn))
             if fo.get(k) != fn.get(k)}
  if not changes:
    return {}
  bookkeeping = set(bookkeeping)
  math = {k: v for k, v in changes.items() if k.split(".")[-1] not in bookkeeping}
  if math and not allow_change:
    listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in math.items())
    raise ValueError(f"--workdir {workdir}: resuming with a changed config ({listed}); these "
                     "change the training math. Use the original values, a new workdir, or "
                     "--allow_config_change to record the change")
  if not write:
    return changes
  with open(os.path.join(workdir, HISTORY_NAME), "a") as f:
    f.write(json.dumps({"step": int(step), "time": datetime.datetime.now().astimezone()
                        .isoformat(timespec="seconds"),
                        "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
  return changes
