"""pass@k estimators against brute-force combinatorics."""

import importlib
import itertools
import math

import numpy as np
import pytest

import soft_grpo

# `soft_grpo.pass_at_k` is the function (issue #5 API); the module is reached by its full name.
pk = importlib.import_module("soft_grpo.pass_at_k")


def _brute_force(n, c, k):
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_unbiased_matches_brute_force(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert soft_grpo.pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)
      assert soft_grpo.pass_at_k(n, c, k) == pytest.approx(
          1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_large_n_stable():
  # math.comb is exact; the product form must agree without overflow.
  n, c, k = 1000, 3, 500
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert soft_grpo.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
  assert 0.0 <= soft_grpo.pass_at_k(5000, 1, 1) <= 1.0


def test_max_over_first_k_and_mean():
  row = [0, 0, 1, 0, 1, 0, 0, 0]
  assert [pk.max_over_first_k(row, k) for k in (1, 2, 3, 8)] == [0.0, 0.0, 1.0, 1.0]
  assert pk.mean_at_n(row) == 0.25


def test_summarize():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
  s = pk.summarize(correct, [1, 2, 4])
  assert s["n"] == 4 and s["num_problems"] == 4
  assert s["mean@n"] == pytest.approx((0.25 + 0 + 1 + 0.25) / 4)
  assert s["pass@k"][1] == pytest.approx(s["mean@n"])  # unbiased pass@1 == mean@n
  assert s["pass@k"][4] == pytest.approx(0.75)
  assert s["max_first_k"][1] == pytest.approx(0.5)
  assert s["max_first_k"][2] == pytest.approx(0.75)
  want2 = np.mean([_brute_force(4, int(c), 2) for c in correct.sum(1)])
  assert s["pass@k"][2] == pytest.approx(want2)


@pytest.mark.parametrize("args, match", [
    ((4, 5, 1), "c="),
    ((4, 1, 5), "k="),
    ((4, 1, 0), "k="),
    ((0, 0, 1), "n="),
    ((4, -1, 1), "c="),
    ((4.0, 1, 1), "n="),
])
def test_validation(args, match):
  with pytest.raises(ValueError, match=match):
    soft_grpo.pass_at_k(*args)
  with pytest.raises(ValueError, match="k="):
    pk.max_over_first_k([1, 0], 3)
