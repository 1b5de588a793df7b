"""Error bars for Pass@k: per-problem scores and percentile-bootstrap intervals over problems.

A policy is evaluated on P problems with n samples each (a [P, n] 0/1 matrix), possibly for
several training seeds (R matrices). The uncertainty that matters for "is policy A better than
B on this task" is mostly the choice of problems, so intervals resample problems: each
bootstrap replicate draws P problems with replacement and averages the per-problem scores
(first averaged over the R seeds of the policy). Paired differences resample the SAME problems
for both policies, which removes the between-problem variance that both share.

Seed-to-seed variance is not inside these intervals (2 seeds cannot estimate it); report the
per-seed values next to them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from soft_grpo.pass_at_k import pass_at_k

ESTIMATORS = ("unbiased", "max_first_k")


@dataclasses.dataclass(frozen=True)
class Interval:
  """Point estimate with a two-sided percentile-bootstrap interval."""
  mean: float
  low: float
  high: float
  confidence: float

  def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
    return (f"{scale * self.mean:.{digits}f} "
            f"[{scale * self.low:.{digits}f}, {scale * self.high:.{digits}f}]")


def per_problem_scores(correct_PxN, k: int, estimator: str = "unbiased") -> np.ndarray:
  """[P] Pass@k of each problem.

  "unbiased": 1 - C(n-c, k) / C(n, k) with c correct of n (k = 1 is mean@n, the paper's
  "Pass@1"); "max_first_k": the official verl metric, 1 if any of the FIRST k samples is correct.
  """
  correct = np.asarray(correct_PxN)
  if correct.ndim != 2 or 0 in correct.shape:
    raise ValueError(f"correct_PxN: shape {correct.shape}; allowed: non-empty [P, n]")
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k}: allowed: 1 <= k <= n={n}")
  if estimator == "unbiased":
    c_P = (correct > 0).sum(axis=1)
    return np.array([pass_at_k(n, int(c), k) for c in c_P], np.float64)
  if estimator == "max_first_k":
    return (correct[:, :k] > 0).any(axis=1).astype(np.float64)
  raise ValueError(f"estimator={estimator!r}; allowed: {list(ESTIMATORS)}")


def _as_runs(values) -> np.ndarray:
  v = np.asarray(values, np.float64)
  if v.ndim == 1:
    v = v[None]
  if v.ndim != 2 or 0 in v.shape:
    raise ValueError(f"values: shape {v.shape}; allowed: [P] or [runs, P], non-empty")
  return v


def _resample_indices(num_problems: int, num_resamples: int, seed: int) -> np.ndarray:
  if num_resamples < 100:
    raise ValueError(f"num_resamples={num_resamples}; allowed: >= 100")
  return np.random.default_rng(seed).integers(0, num_problems, (num_resamples, num_problems))


def _interval(point: float, replicates: np.ndarray, confidence: float) -> Interval:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence={confidence}; allowed: (0, 1)")
  alpha = (1.0 - confidence) / 2.0
  low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
  return Interval(float(point), float(low), float(high), confidence)


def bootstrap_mean(values, *, num_resamples: int = 10_000, confidence: float = 0.95,
                   seed: int = 0) -> Interval:
  """Mean over problems (and runs) of per-problem scores `values` ([P] or [runs, P]) with a
  percentile-bootstrap interval over problems."""
  per_problem = _as_runs(values).mean(axis=0)
  idx = _resample_indices(per_problem.size, num_resamples, seed)
  return _interval(per_problem.mean(), per_problem[idx].mean(axis=1), confidence)


def bootstrap_paired_difference(a, b, *, num_resamples: int = 10_000,
                                confidence: float = 0.95, seed: int = 0) -> Interval:
  """mean(a) - mean(b) over the same problems (each [P] or [runs, P]; the run counts may
  differ), bootstrapping problems jointly for both."""
  a_P, b_P = _as_runs(a).mean(axis=0), _as_runs(b).mean(axis=0)
  if a_P.shape != b_P.shape:
    raise ValueError(f"paired difference: {a_P.size} vs {b_P.size} problems; the policies "
                     "must be evaluated on the same problems")
  d_P = a_P - b_P
  idx = _resample_indices(d_P.size, num_resamples, seed)
  return _interval(d_P.mean(), d_P[idx].mean(axis=1), confidence)


def pass_at_k_intervals(corrects: Sequence, ks: Sequence[int], estimator: str = "unbiased",
                        **bootstrap) -> dict[int, Interval]:
  """{k: Interval} for a policy given its [P, n] matrices (one per seed)."""
  return {k: bootstrap_mean(np.stack([per_problem_scores(c, k, estimator) for c in corrects]),
                            **bootstrap) for k in ks}
