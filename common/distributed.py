"""Start-up of JAX's multi-controller runtime (`jax.distributed`), once per process.

Every entry point calls `initialize(...)` before its first JAX computation:

* explicit flags (`coordinator_address`, `num_processes`, `process_id`): used as given
  (two processes on one laptop, or any launcher that sets them);
* no flags, but a cluster environment that `jax.distributed.initialize()` detects on its own
  (a Cloud TPU pod slice, SLURM with more than one task, Open MPI): auto-detection;
* no flags and no cluster: a single process, nothing to do.

On CPU with more than one process the cross-process collectives need an implementation;
gloo is the one that ships with jaxlib. Heartbeat and shutdown timeouts are bounded, so if a
peer dies the others stop instead of hanging: a watchdog thread ends a process whose peer went
silent with one line on stderr and exit code 75 (`PEER_LOST_EXIT_CODE`) within `peer_timeout_s`.
If process 0 itself (the coordinator) dies, jax's runtime aborts the other processes at once
from a C++ thread, printing "Terminating process because the JAX distributed service detected
fatal errors ... another task died" and a stack trace: bounded in time, but not one line
(jax 0.10 offers no Python hook there; its `missed_heartbeat_callback` cannot receive the
status from Python).
"""

from __future__ import annotations

import dataclasses
import os

import jax

# Environment variables that mark a multi-process cluster jax can auto-detect.
_CLUSTER_ENV_MARKERS = (
    ("SLURM_JOB_ID", "SLURM_NTASKS"),               # SLURM: several tasks
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_HOSTNAMES"),  # Cloud TPU pod slice
)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None   # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = 60             # the runtime aborts a process whose peer is silent
  peer_timeout_s: float = 20.0              # our watchdog's limit: clean one-line exit before that
  initialization_timeout_s: int = 300
  shutdown_timeout_s: int = 60

  def __post_init__(self):
    given = [self.coordinator_address is not None, self.num_processes is not None,
             self.process_id is not None]
    if any(given) and not all(given):
      raise ValueError("distributed: --coordinator_address, --num_processes and --process_id "
                       "go together; allowed: all three or none (auto-detect)")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"distributed.num_processes: {self.num_processes} < 1; allowed: >= 1")
    if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
      raise ValueError(f"distributed.process_id: {self.process_id} not in "
                       f"[0, num_processes={self.num_processes})")
    if self.coordinator_address is not None and ":" not in self.coordinator_address:
      raise ValueError(f"distributed.coordinator_address: {self.coordinator_address!r} has no "
                       "port; allowed: 'host:port'")
    for name in ("heartbeat_timeout_s", "initialization_timeout_s", "shutdown_timeout_s"):
      if getattr(self, name) < 1:
        raise ValueError(f"distributed.{name}: {getattr(self, name)} < 1; allowed: >= 1 s")
    if not 0 < self.peer_timeout_s < self.heartbeat_timeout_s:
      raise ValueError(f"distributed.peer_timeout_s: {self.peer_timeout_s}; allowed: > 0 and < "
                       f"heartbeat_timeout_s={self.heartbeat_timeout_s}")


def cluster_detected(environ=None) -> bool:
  """True when the environment is a multi-process cluster jax can auto-detect."""
  env = os.environ if environ is None else environ
  if "SLURM_JOB_ID" in env:
    try:
      return int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
      return False
  if "OMPI_COMM_WORLD_SIZE" in env:
    try:
      return int(env["OMPI_COMM_WORLD_SIZE"]) > 1
    except ValueError:
      return False
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def _is_initialized() -> bool:
  from jax._src import distributed as _dist  # no public accessor in jax 0.10
  return _dist.global_state.client is not None


def _platform_is_cpu() -> bool:
  platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  # No platform requested: cpu unless an accelerator plugin is installed. Checking backends
  # here would start them before initialize(), which jax forbids.
  import importlib.util
  for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin"):
    if importlib.util.find_spec(plugin) is not None:
      return False
  return True


def initialize(config: DistributedConfig | None = None) -> bool:
  """Starts `jax.distributed` when there is more than one process. Returns True if started.

  Idempotent: a second call (or a runtime started by someone else) is a no-op.
  """
  config = config or DistributedConfig()
  if _is_initialized():
    return True
  explicit = config.coordinator_address is not None
  if explicit and config.num_processes == 1:
    return False
  if not explicit and not cluster_detected():
    return False
  multi_cpu = _platform_is_cpu()
  if multi_cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=config.initialization_timeout_s,
                heartbeat_timeout_seconds=config.heartbeat_timeout_s,
                shutdown_timeout_seconds=config.shutdown_timeout_s)
  if explicit:
    jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  if jax.process_count() > 1:
    _start_peer_watchdog(config.peer_timeout_s)
  return True


_EXITED = "exited"   # a process's last heartbeat value when it ends normally
PEER_LOST_EXIT_CODE = 75   # EX_TEMPFAIL: restart all processes; they resume from a checkpoint


def _die(msg: str) -> None:
  import sys
  sys.stderr.write(f"error: {msg}\n")
  sys.stderr.flush()
  os._exit(PEER_LOST_EXIT_CODE)


def _start_peer_watchdog(timeout_s: float) -> None:
  """Each process bumps a counter in the coordination service's key-value store; a daemon
  thread watches the others'. A peer whose counter stops for `timeout_s` (or a coordinator
  that stops answering) ends this process with one line and exit code 75, before the
  runtime's own heartbeat check would abort it with a C++ stack trace (or a collective would
  wait forever)."""
  import threading
  import time

  from jax._src import distributed as _dist

  client = _dist.global_state.client
  me, n = jax.process_index(), jax.process_count()
  interval = max(min(timeout_s / 5, 2.0), 0.05)

  die = _die

  stop = threading.Event()

  def loop():
    beat = 0
    last_seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
    while not stop.is_set():
      beat += 1
      try:
        client.key_value_set(f"ls_softgrpo/alive/{me}", str(beat), allow_overwrite=True)
        for p, (old, t) in list(last_seen.items()):
          val = client.key_value_try_get(f"ls_softgrpo/alive/{p}")
          now = time.monotonic()
          if val == _EXITED:    # the peer finished normally and waits in jax's shutdown
            del last_seen[p]
          elif val != old:
            last_seen[p] = (val, now)
          elif now - t > timeout_s:
            die(f"process {p} of {n} stopped responding (no heartbeat for {timeout_s:g} s); "
                f"process {me} exits. Restart all processes to resume from the last "
                "checkpoint.")
      except Exception as e:  # the coordinator's store is gone: process 0 died
        if "NOT_FOUND" in str(e):
          pass  # a peer has not written its first beat yet
        else:
          die(f"lost the coordinator (process 0) of {n} processes "
              f"({str(e).splitlines()[0][:120]}); process {me} exits. Restart all processes "
              "to resume from the last checkpoint.")
      stop.wait(interval)

  thread = threading.Thread(target=loop, name="peer-watchdog", daemon=True)
  thread.start()

  def stop_watchdog():
    # At exit, before jax's own atexit hook shuts the distributed client down (atexit runs
    # last-registered first, and jax registered its hook at import), so the thread never polls
    # a client being destroyed (suspected cause of a rare abort of process 1 at shutdown under
    # load: "terminate called after throwing ..."; not proven).
    stop.set()
    thread.join(timeout=interval + 5.0)
    try:   # peers still working must not take this process's silence for a death
      client.key_value_set(f"ls_softgrpo/alive/{me}", _EXITED, allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may already be gone; nothing to tell
      pass

  import atexit
  atexit.register(stop_watchdog)


def is_main_process() -> bool:
  """Process 0 writes logs, plots and exports; every process joins checkpoints."""
  return jax.process_index() == 0
