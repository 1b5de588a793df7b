"""Launch N local JAX processes (gloo on CPU) and collect what they print.

Each process runs `python -c CODE` or `python -m MODULE ARGS` with
`--xla_force_host_platform_device_count=M`, the coordinator address of a free local port,
and its process id, in its own process group. Only the processes started here are killed,
when the timeout passes or the test ends. `run_module` runs an entry point of experiments/
on 1 or N processes with the distributed flags of experiments/cli.py and checks the exits.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Result:
  returncode: int | None
  stdout: str
  stderr: str


def env_for(devices_per_process: int, extra: dict | None = None) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra or {})
  return env


def launch(argv_for_process, num_processes: int, devices_per_process: int, *,
           timeout: float = 240, cwd: str = REPO, env: dict | None = None,
           on_started=None) -> list[Result]:
  """argv_for_process(process_id, coordinator_address) -> argv list. Returns one Result per
  process (returncode None if it had to be killed at the timeout)."""
  address = f"127.0.0.1:{free_port()}"
  procs = []
  try:
    for pid in range(num_processes):
      procs.append(subprocess.Popen(
          argv_for_process(pid, address), cwd=cwd, env=env_for(devices_per_process, env),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    if on_started is not None:
      on_started(procs)
    deadline = time.monotonic() + timeout
    results = [None] * num_processes
    for i, p in enumerate(procs):
      try:
        out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        results[i] = Result(p.returncode, out, err)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        results[i] = Result(None, out, err)
    return results
  finally:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()


def python_argv(code: str):
  return lambda pid, address: [sys.executable, "-c", code, address, str(pid)]


def distributed_flags(process_id: int, address: str, num_processes: int) -> list[str]:
  """The multi-process flags every entry point takes (experiments/cli.py)."""
  return [f"--coordinator_address={address}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def run_module(module: str, args, *, num_processes: int = 1, devices: int,
               timeout: float = 240) -> list[Result]:
  """`python -m module *args` on `num_processes` local processes that share `devices` CPU
  devices evenly (the distributed flags added when more than one); fails with every process's
  exit code and the stderr tail of the first one that did not exit 0."""
  if devices % num_processes:
    raise ValueError(f"{devices} devices do not split over {num_processes} processes")

  def argv(pid, address):
    flags = distributed_flags(pid, address, num_processes) if num_processes > 1 else []
    return [sys.executable, "-m", module, *args, *flags]
  results = launch(argv, num_processes, devices // num_processes, timeout=timeout)
  codes = [r.returncode for r in results]   # None: killed at the timeout
  for pid, r in enumerate(results):
    if r.returncode != 0:
      raise AssertionError(f"{module} on {num_processes} process(es): exit codes {codes}; "
                           f"stderr of process {pid}:\n{r.stderr[-3000:]}")
  return results
