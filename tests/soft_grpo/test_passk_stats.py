"""Bootstrap intervals for Pass@k (soft_grpo/passk_stats.py)."""

import numpy as np
import pytest

from soft_grpo.pass_at_k import max_over_first_k, pass_at_k, summarize
from soft_grpo import passk_stats as ps


def _correct(rng, p_P, n):
  return (rng.random((p_P.size, n)) < p_P[:, None]).astype(int)


def test_per_problem_scores_match_the_scalar_estimators():
  rng = np.random.default_rng(0)
  c = _correct(rng, rng.random(20), 16)
  for k in (1, 4, 16):
    unb = ps.per_problem_scores(c, k, "unbiased")
    mx = ps.per_problem_scores(c, k, "max_first_k")
    np.testing.assert_allclose(unb, [pass_at_k(16, int(r.sum()), k) for r in c])
    np.testing.assert_allclose(mx, [max_over_first_k(r, k) for r in c])
    s = summarize(c, [k])
    assert unb.mean() == pytest.approx(s["pass@k"][k])
    assert mx.mean() == pytest.approx(s["max_first_k"][k])
  np.testing.assert_allclose(ps.per_problem_scores(c, 1), c.mean(axis=1))


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
  rng = np.random.default_rng(1)
  p_true = rng.beta(0.7, 1.5, size=10_000)      # a "population" of problem difficulties
  covered = 0
  trials = 200
  for t in range(trials):
    problems = rng.choice(p_true, 64)
    scores = ps.per_problem_scores(_correct(rng, problems, 32), 1)
    iv = ps.bootstrap_mean(scores, num_resamples=1000, seed=t)
    assert iv.low <= iv.mean <= iv.high
    covered += iv.low <= p_true.mean() <= iv.high
  assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_paired_difference_removes_shared_problem_variance():
  rng = np.random.default_rng(2)
  base = rng.random(64)                          # very different problems
  a = np.clip(base + 0.05 + 0.01 * rng.standard_normal(64), 0, 1)
  paired = ps.bootstrap_paired_difference(a, base)
  unpaired_width = (ps.bootstrap_mean(a).high - ps.bootstrap_mean(a).low)
  assert paired.low > 0.0                        # the small, consistent gain is detected
  assert paired.high - paired.low < 0.2 * unpaired_width
  exact = ps.bootstrap_paired_difference(base + 0.1, base)
  assert exact.mean == pytest.approx(0.1) and exact.low == pytest.approx(0.1)
  assert exact.high == pytest.approx(0.1)


def test_runs_are_averaged_per_problem_before_resampling():
  v = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
  iv = ps.bootstrap_mean(v, num_resamples=500)
  assert iv.mean == pytest.approx(0.5)
  assert ps.bootstrap_mean(v.mean(axis=0), num_resamples=500) == iv
  by_k = ps.pass_at_k_intervals([np.eye(4, dtype=int)] * 2, [1, 4], num_resamples=200)
  assert by_k[1].mean == pytest.approx(0.25) and by_k[4].mean == pytest.approx(1.0)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="same problems"):
    ps.bootstrap_paired_difference(np.ones(4), np.ones(5))
  with pytest.raises(ValueError, match="estimator"):
    ps.per_problem_scores(np.ones((2, 4)), 1, "best")
  with pytest.raises(ValueError, match="k=5"):
    ps.per_problem_scores(np.ones((2, 4)), 5)
  with pytest.raises(ValueError, match="num_resamples"):
    ps.bootstrap_mean(np.ones(4), num_resamples=10)
  with pytest.raises(ValueError, match="confidence"):
    ps.bootstrap_mean(np.ones(4), confidence=95)
