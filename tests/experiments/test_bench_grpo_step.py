"""bench_grpo_step: our phase-split step runs on the tiny `test` preset; the table's ratios."""

import numpy as np

from experiments import bench_grpo_step as bench


def test_our_timed_steps_split_the_step_and_train():
  ours = bench.OurRuns("test", ["discrete", "soft_gumbel"])
  try:
    before = {m: np.asarray(s.params["embed_tokens"]["embedding"]).copy()
              for m, (_, s) in ours.runs.items()}
    for i in range(2):
      ours.step(i)
  finally:
    ours.close()
  for mode, times in ours.times.items():
    assert len(times) == 2
    for t in times:
      parts = sum(t[p] for p in ("rollout", "reward", "scoring", "update"))
      assert all(t[p] >= 0 for p in bench.PHASES)
      np.testing.assert_allclose(parts, t["total"], rtol=1e-6)
    _, state = ours.runs[mode]
    assert int(state.step) == 2
    after = np.asarray(state.params["embed_tokens"]["embedding"])
    assert not np.array_equal(before[mode], after)   # the updates changed the policy


def test_table_medians_and_ratios():
  mk = lambda x: {p: x for p in bench.PHASES}
  med = {"discrete": bench.medians([mk(9.0), mk(2.0), mk(4.0), mk(3.0)], warmup=1),
         "soft_gumbel": mk(3.3), "trl": mk(6.0)}
  assert med["discrete"]["total"] == 3.0
  text = bench.table(med, ref="trl")
  row = [r for r in text.splitlines() if r.startswith("| total")][0]
  assert row == "| total | 3.00 | 3.30 | 6.00 | 0.50x | 0.55x | 1.10x |"
