"""Rule-based reward: 1 if the final answer verifies against the reference, else 0.

`score_response` runs in-process (screening + math-verify's own timeouts, which work only on
the main thread and can be swallowed: issue 12 found math-verify's SIGALRM firing inside
jax's GC callback and discarded). `RewardScorer` is the path training and evaluation use: it
extracts and screens answers in this process (cheap, bounded) and runs math-verify in a
`pebble.ProcessPool` with a hard per-answer deadline. A worker that overruns it (e.g. stuck
in C-level big-integer arithmetic that no signal can interrupt) is killed and replaced by
pebble, and the answer counts as "timeout". `concurrent.futures` cannot kill a stuck worker,
hence pebble. Workers are started with "spawn": forking a process that runs jax threads is
unsafe. Nothing here raises on model text; every answer yields (reward, status).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
from typing import Sequence

import numpy as np
import pebble

from soft_grpo import answer_check
from soft_grpo import validate as v
from soft_grpo.answer_check import STATUSES, AnswerCheckConfig  # noqa: F401

_S = "reward"


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The `reward` section; `check` holds the limits on untrusted model text."""
  check: AnswerCheckConfig = AnswerCheckConfig()
  num_workers: int = 2            # math-verify worker processes (>= 1: the deadline is real)
  item_deadline_s: float = 3.0    # hard wall-clock limit per answer, from its start in a worker
  startup_timeout_s: float = 60.0  # the workers must import math-verify by then

  def __post_init__(self):
    v.check_int(_S, "num_workers", self.num_workers, 1)
    v.check_number(_S, "item_deadline_s", self.item_deadline_s, 0.0, strict=True)
    v.check_number(_S, "startup_timeout_s", self.startup_timeout_s, 0.0, strict=True)


def score_response(text, gold, config: AnswerCheckConfig = AnswerCheckConfig()
                   ) -> tuple[float, str]:
  """(reward, status) for one response, in this process (no hard deadline).  Never raises."""
  return answer_check.check(text, gold, config)


def count_statuses(statuses: Sequence[str]) -> dict[str, int]:
  """{status: count} over all known statuses (zeros included), for logging."""
  counts = collections.Counter(statuses)
  return {s: int(counts.get(s, 0)) for s in STATUSES}


def _warm_up() -> bool:
  """Runs in every worker before its first task (pebble `initializer`), so that importing
  math-verify and sympy is not charged to an answer's deadline, also in a replaced worker."""
  return answer_check.verify_answer("1", "1", AnswerCheckConfig()) == (1.0, "ok")


class RewardScorer:
  """Batch reward scoring with a hard per-answer deadline.  Use as a context manager.

    with RewardScorer(RewardConfig()) as scorer:
      rewards_N, statuses = scorer.score_batch(texts, golds)
  """

  def __init__(self, config: RewardConfig = RewardConfig()):
    self.config = config
    self._pool = pebble.ProcessPool(max_workers=config.num_workers, initializer=_warm_up,
                                    context=multiprocessing.get_context("spawn"))
    warm = [self._pool.schedule(_warm_up) for _ in range(config.num_workers)]
    try:
      for f in warm:
        f.result(timeout=config.startup_timeout_s)
    except concurrent.futures.TimeoutError:
      self.close()
      raise RuntimeError(f"reward workers did not start within reward.startup_timeout_s="
                         f"{config.startup_timeout_s}") from None
    except Exception as e:
      self.close()
      raise RuntimeError(f"reward worker failed to start (is math-verify installed?): "
                         f"{type(e).__name__}: {e}") from None

  def close(self) -> None:
    pool, self._pool = getattr(self, "_pool", None), None
    if pool is not None:
      pool.stop()
      pool.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self.close()

  def score_batch(self, texts: Sequence[str], golds: Sequence[str]
                  ) -> tuple[np.ndarray, list[str]]:
    """Rewards [N] float32 and statuses (one of `STATUSES`) for N responses."""
    if len(texts) != len(golds):
      raise ValueError(f"len(texts)={len(texts)} != len(golds)={len(golds)}")
    if self._pool is None:
      raise RuntimeError("RewardScorer is closed")
    n = len(texts)
    rewards = np.zeros(n, np.float32)
    statuses = [answer_check.STATUS_ERROR] * n
    futures = {}
    for i, (text, gold) in enumerate(zip(texts, golds)):
      # Extraction and screening are cheap and bounded: do them here.
      try:
        answer, status = answer_check.extract_answer(text, self.config.check)
      except Exception:
        answer, status = None, answer_check.STATUS_ERROR
      if answer is None:
        statuses[i] = status
      else:
        futures[i] = self._pool.schedule(
            answer_check.verify_answer, args=(answer, str(gold), self.config.check),
            timeout=self.config.item_deadline_s)
    for i, future in futures.items():
      try:
        rewards[i], statuses[i] = future.result()
      except concurrent.futures.TimeoutError:
        rewards[i], statuses[i] = 0.0, answer_check.STATUS_TIMEOUT
      except Exception:            # the worker died (pebble.ProcessExpired) or raised
        rewards[i], statuses[i] = 0.0, answer_check.STATUS_ERROR
    return rewards, statuses


def make_reward_fn(config: RewardConfig):
  """(texts, golds) -> (rewards [N], {status: count}) with a `close()` for the workers."""
  scorer = RewardScorer(config)

  def reward_fn(texts, golds):
    r, statuses = scorer.score_batch(texts, golds)
    return r, count_statuses(statuses)
  reward_fn.close = scorer.close
  return reward_fn
