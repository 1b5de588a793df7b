"""jax.distributed start-up: explicit flags, auto-detection, gloo on CPU, dead peers."""

import os
import signal
import threading
import time

import pytest

from common import distributed
from tests import multiprocess

_WORKER = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from common import distributed
address, pid = sys.argv[1], int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "sum"
distributed.initialize(distributed.DistributedConfig(address, 2, pid, heartbeat_timeout_s=30,
                                                     peer_timeout_s=3))
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                           np.arange(2, dtype=np.float32) + 2 * pid)
f = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(f(x)),
      flush=True)
if mode == "wait":
  time.sleep(120)
if mode == "late" and pid == 0:   # process 1 ends normally long before process 0
  time.sleep(10)
  print("LATE DONE", flush=True)
"""


def test_two_processes_reduce_over_one_mesh():
  res = multiprocess.launch(multiprocess.python_argv(_WORKER), 2, 2, timeout=180)
  lines = sorted(l for r in res for l in r.stdout.splitlines() if l.startswith("RESULT"))
  assert [r.returncode for r in res] == [0, 0], [r.stderr[-2000:] for r in res]
  assert lines == ["RESULT 0 2 4 6.0", "RESULT 1 2 4 6.0"]


def test_a_peer_that_ends_normally_first_is_not_taken_for_dead():
  """The watchdog stops at exit and marks the process as exited, so a peer still working
  (longer than peer_timeout_s = 3 s) carries on and both exit 0."""
  res = multiprocess.launch(lambda pid, a: multiprocess.python_argv(_WORKER)(pid, a) + ["late"],
                            2, 2, timeout=180)
  assert [r.returncode for r in res] == [0, 0], [r.stderr[-2000:] for r in res]
  assert "LATE DONE" in res[0].stdout
  assert not [l for r in res for l in r.stderr.splitlines() if l.startswith("error: ")]


def test_dead_peer_ends_the_other_with_one_line():
  def kill_second_when_ready(procs):
    def watch():
      for line in procs[1].stdout:
        if line.startswith("RESULT"):
          os.killpg(procs[1].pid, signal.SIGKILL)
          return
    threading.Thread(target=watch, daemon=True).start()

  t0 = time.monotonic()
  res = multiprocess.launch(lambda pid, a: multiprocess.python_argv(_WORKER)(pid, a) + ["wait"],
                            2, 2, timeout=120, on_started=kill_second_when_ready)
  assert time.monotonic() - t0 < 100
  assert res[0].returncode == distributed.PEER_LOST_EXIT_CODE, res[0].stderr[-2000:]
  errors = [l for l in res[0].stderr.splitlines() if l.startswith("error: ")]
  assert errors == ["error: process 1 of 2 stopped responding (no heartbeat for 3 s); process 0 "
                    "exits. Restart all processes to resume from the last checkpoint."]


def test_single_process_without_flags_does_nothing(monkeypatch):
  for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(distributed.DistributedConfig("127.0.0.1:1", 1, 0)) is False


def test_cluster_detection():
  assert not distributed.cluster_detected({})
  assert not distributed.cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
  assert distributed.cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "h0,h1"})
  assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "h0"})


@pytest.mark.parametrize("kwargs, field", [
    (dict(coordinator_address="h:1"), "go together"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes"),
    (dict(peer_timeout_s=100, heartbeat_timeout_s=60), "peer_timeout_s")])
def test_config_errors(kwargs, field):
  with pytest.raises(ValueError, match=field):
    distributed.DistributedConfig(**kwargs)
