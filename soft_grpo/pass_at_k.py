"""Pass@k estimators for the evaluation (issue #5 "Evaluation")."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, Codex).

  Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge
  binomials.  n samples, c of them correct, 1 <= k <= n.
  """
  _check_int("n", n, 1)
  _check_int("c", c, 0)
  _check_int("k", k, 1)
  if c > n:
    raise ValueError(f"c={c} must be <= n={n}")
  if k > n:
    raise ValueError(f"k={k} must be <= n={n}")
  if n - c < k:
    return 1.0
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def max_over_first_k(correct: Sequence, k: int) -> float:
  """Official-style pass@k: max score over the first k samples of a problem."""
  _check_int("k", k, 1)
  if k > len(correct):
    raise ValueError(f"k={k} must be <= number of samples {len(correct)}")
  return float(max(float(x) for x in correct[:k]))


def mean_at_n(correct: Sequence) -> float:
  """mean@n: average score over all n samples (the paper's "Pass@1")."""
  if len(correct) == 0:
    raise ValueError("correct must be non-empty")
  return float(np.mean(np.asarray(correct, np.float64)))


def summarize(correct_PxN, ks: Iterable[int]) -> dict:
  """Average over P problems of pass@k (unbiased and max-over-first-k) and mean@n.

  Args:
    correct_PxN: [P, N] 0/1 (or bool) correctness of N samples per problem.
    ks: the k values, each in [1, N].
  Returns:
    {"n": N, "num_problems": P, "mean@n": ..., "pass@k": {k: ...},
     "max_first_k": {k: ...}}.
  """
  correct = np.asarray(correct_PxN, np.float64)
  if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
    raise ValueError(f"correct_PxN must be a non-empty 2-D array, got shape {correct.shape}")
  p, n = correct.shape
  c_P = (correct > 0).sum(axis=1)
  out = {"n": n, "num_problems": p,
         "mean@n": float(np.mean([mean_at_n(row) for row in correct])),
         "pass@k": {}, "max_first_k": {}}
  for k in ks:
    out["pass@k"][int(k)] = float(np.mean([pass_at_k(n, int(c), int(k)) for c in c_P]))
    out["max_first_k"][int(k)] = float(np.mean([max_over_first_k(row, int(k)) for row in correct]))
  return out


def parse_ks(text: str, n: int) -> list[int]:
  """"1,8,32" -> [1, 8, 32]; every k must be in [1, n]."""
  try:
    ks = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--k={text!r} must be comma-separated ints") from None
  if not ks or any(k < 1 or k > n for k in ks):
    raise ValueError(f"--k={text!r}: every k must be in [1, n={n}]")
  return ks


def markdown_table(res: dict, title: str) -> str:
  """A `summarize` result (plus "num_problems") as a markdown section."""
  ks = sorted(res["pass@k"], key=int)
  head = "| estimator | " + " | ".join(f"Pass@{k}" for k in ks) + " |"
  sep = "|---|" + "---|" * len(ks)
  unb = "| unbiased | " + " | ".join(f"{100 * res['pass@k'][k]:.1f}" for k in ks) + " |"
  mx = "| max over first k | " + " | ".join(
      f"{100 * res['max_first_k'][k]:.1f}" for k in ks) + " |"
  return (f"### {title}\n\nmean@{res['n']} (paper's Pass@1): {100 * res['mean@n']:.1f}% over "
          f"{res['num_problems']} problems\n\n{head}\n{sep}\n{unb}\n{mx}\n")
