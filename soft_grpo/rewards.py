"""Rule-based reward: 1 if the final answer verifies against the reference, else 0.

`score_response` runs in-process (screening + math-verify's own timeouts).
`RewardScorer` scores a batch and, with `num_workers >= 1`, runs math-verify
in persistent worker processes with a hard per-answer deadline: a worker that
overruns it (e.g. stuck in C-level big-integer arithmetic that no signal can
interrupt) is killed and replaced, and the answer is counted as "timeout".
Nothing here raises on model text; every answer yields (reward, status).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from soft_grpo import answer_check
from soft_grpo.answer_check import STATUSES, AnswerCheckConfig  # noqa: F401

_ANSWER_CHECK_PATH = os.path.abspath(answer_check.__file__)
# Loads answer_check.py by path, so the worker imports neither jax nor the
# soft_grpo package, and the soft_grpo/ directory is not put on sys.path.
_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('soft_grpo_answer_check', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod.worker_main(sys.argv[2])\n")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward settings; `check` holds the limits on untrusted model text."""
  check: AnswerCheckConfig = AnswerCheckConfig()
  num_workers: int = 2            # 0: verify in-process (no hard deadline)
  item_deadline_s: float = 3.0    # hard wall-clock limit per answer (workers)
  startup_timeout_s: float = 60.0  # a worker must import math-verify by then

  def __post_init__(self):
    if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or (
        self.num_workers < 0):
      raise ValueError(f"num_workers={self.num_workers!r} must be an int >= 0")
    if not self.item_deadline_s > 0:
      raise ValueError(f"item_deadline_s={self.item_deadline_s!r} must be > 0")
    if not self.startup_timeout_s > 0:
      raise ValueError(f"startup_timeout_s={self.startup_timeout_s!r} must be > 0")


def score_response(text, gold, config: AnswerCheckConfig = AnswerCheckConfig()
                   ) -> tuple[float, str]:
  """(reward, status) for one response, in this process.  Never raises."""
  return answer_check.check(text, gold, config)


def count_statuses(statuses: Sequence[str]) -> dict[str, int]:
  """{status: count} over all known statuses (zeros included), for logging."""
  counts = collections.Counter(statuses)
  return {s: int(counts.get(s, 0)) for s in STATUSES}


class _Worker:
  """One verification subprocess speaking JSON lines."""

  def __init__(self, check_config: AnswerCheckConfig):
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER_BOOT, _ANSWER_CHECK_PATH,
         json.dumps(dataclasses.asdict(check_config))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, bufsize=0)
    self.fd = self.proc.stdout.fileno()
    self.buffer = b""
    self.ready = False
    self.started = time.monotonic()
    self.task: int | None = None     # index of the in-flight answer
    self.task_started = 0.0

  def send(self, index: int, answer: str, gold: str) -> None:
    msg = json.dumps({"i": index, "a": answer, "g": gold}) + "\n"
    self.proc.stdin.write(msg.encode())
    self.task, self.task_started = index, time.monotonic()

  def read_lines(self) -> list[dict] | None:
    """Complete messages available now; None if the worker has exited."""
    chunk = os.read(self.fd, 65536)
    if not chunk:
      return None
    self.buffer += chunk
    *lines, self.buffer = self.buffer.split(b"\n")
    return [json.loads(line) for line in lines if line.strip()]

  def kill(self) -> None:
    try:
      self.proc.kill()
      self.proc.wait(timeout=5)
    except Exception:
      pass
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except Exception:
        pass


class RewardScorer:
  """Batch reward scoring with a hard per-answer deadline.  Use as a context manager.

    with RewardScorer(RewardConfig()) as scorer:
      rewards_N, statuses = scorer.score_batch(texts, golds)
  """

  def __init__(self, config: RewardConfig = RewardConfig()):
    self.config = config
    self._workers: list[_Worker] = []
    if config.num_workers:
      self._workers = [_Worker(config.check) for _ in range(config.num_workers)]
      self._wait_ready(self._workers)

  def _wait_ready(self, workers: list[_Worker]) -> None:
    deadline = time.monotonic() + self.config.startup_timeout_s
    pending = [w for w in workers if not w.ready]
    while pending:
      left = deadline - time.monotonic()
      if left <= 0:
        raise RuntimeError(
            f"reward worker did not start within startup_timeout_s="
            f"{self.config.startup_timeout_s}")
      readable, _, _ = select.select([w.fd for w in pending], [], [], left)
      for w in pending:
        if w.fd in readable:
          msgs = w.read_lines()
          if msgs is None:
            raise RuntimeError("reward worker exited during startup "
                               "(is math-verify installed?)")
          if any(m.get("ready") for m in msgs):
            w.ready = True
      pending = [w for w in pending if not w.ready]

  def close(self) -> None:
    for w in self._workers:
      w.kill()
    self._workers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self.close()

  def _replace(self, i: int) -> None:
    self._workers[i].kill()
    self._workers[i] = _Worker(self.config.check)

  def score_batch(self, texts: Sequence[str], golds: Sequence[str]
                  ) -> tuple[np.ndarray, list[str]]:
    """Rewards [N] float32 and statuses (one of `STATUSES`) for N responses."""
    if len(texts) != len(golds):
      raise ValueError(f"len(texts)={len(texts)} != len(golds)={len(golds)}")
    n = len(texts)
    rewards = np.zeros(n, np.float32)
    statuses = [answer_check.STATUS_ERROR] * n
    todo: collections.deque = collections.deque()
    for i, (text, gold) in enumerate(zip(texts, golds)):
      # Extraction and screening are cheap and bounded: do them here.
      try:
        answer, status = answer_check.extract_answer(text, self.config.check)
      except Exception:
        answer, status = None, answer_check.STATUS_ERROR
      if answer is None:
        statuses[i] = status
      elif not self._workers:
        rewards[i], statuses[i] = answer_check.verify_answer(
            answer, str(gold), self.config.check)
      else:
        todo.append((i, answer, str(gold)))
    if todo:
      self._run_workers(todo, rewards, statuses)
    return rewards, statuses

  def _run_workers(self, todo, rewards, statuses) -> None:
    deadline_s = self.config.item_deadline_s
    in_flight = 0
    while todo or in_flight:
      # Dispatch one answer to each idle, ready worker.
      for w in self._workers:
        if w.ready and w.task is None and todo:
          i, answer, gold = todo.popleft()
          try:
            w.send(i, answer, gold)
            in_flight += 1
          except OSError:
            todo.appendleft((i, answer, gold))
            w.task = -1  # broken pipe: replaced below
      now = time.monotonic()
      waits = [deadline_s - (now - w.task_started) for w in self._workers
               if w.task is not None]
      waits += [self.config.startup_timeout_s - (now - w.started)
                for w in self._workers if not w.ready]
      timeout = max(0.0, min(waits)) if waits else 0.0
      readable, _, _ = select.select([w.fd for w in self._workers], [], [], timeout)
      for idx, w in enumerate(self._workers):
        if w.fd in readable:
          msgs = w.read_lines()
          if msgs is None:  # worker died: its answer counts as an error
            if w.task is not None and w.task >= 0:
              statuses[w.task] = answer_check.STATUS_ERROR
              in_flight -= 1
            elif w.task == -1:
              pass
            self._replace(idx)
            continue
          for m in msgs:
            if m.get("ready"):
              w.ready = True
            elif w.task is not None and m.get("i") == w.task:
              rewards[w.task] = float(m["r"])
              statuses[w.task] = str(m["s"])
              w.task = None
              in_flight -= 1
      now = time.monotonic()
      for idx, w in enumerate(self._workers):
        if w.task is not None and w.task >= 0 and now - w.task_started > deadline_s:
          statuses[w.task] = answer_check.STATUS_TIMEOUT
          rewards[w.task] = 0.0
          in_flight -= 1
          self._replace(idx)
        elif w.task == -1:
          self._replace(idx)
        elif not w.ready and now - w.started > self.config.startup_timeout_s:
          raise RuntimeError(
              f"reward worker did not restart within startup_timeout_s="
              f"{self.config.startup_timeout_s}")
