"""Rewards on adversarial model text: never raise, never hang, counted statuses."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from soft_grpo import answer_check
from soft_grpo import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ADVERSARIAL = {
    # name: (text, expected status, expected reward)
    "plain": (r"so the answer is \boxed{42}.", "ok", 1.0),
    "wrong": (r"\boxed{41}", "ok", 0.0),
    "equivalent_latex": (r"\boxed{\frac{84}{2}}", "ok", 1.0),
    "multiple_boxes_last_wins": (r"\boxed{41} no wait \boxed{42}", "ok", 1.0),
    "multiple_boxes_last_wrong": (r"\boxed{42} no wait \boxed{41}", "ok", 0.0),
    "boxed_text": (r"\boxed{\text{42}}", "ok", 1.0),
    "boxed_text_words": (r"\boxed{\text{forty two}}", None, 0.0),
    "nested_braces_ok": (r"\boxed{{4}{2}}", None, None),
    "huge_number": ("\\boxed{" + "9" * 100_000 + "}", "unparseable", 0.0),
    "long_number_in_range": ("\\boxed{" + "9" * 200 + "}", "unparseable", 0.0),
    "power_tower": (r"\boxed{10^{10^{10^{10}}}}", None, 0.0),
    "power_tower_plain": (r"\boxed{10^10^10^10}", None, 0.0),
    "factorial_tower": (r"\boxed{10!!!!}", None, 0.0),
    "deep_frac": ("\\boxed{" + "\\frac{" * 60 + "1" + "}{2}" * 60 + "}", "unparseable", 0.0),
    "deep_braces": ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "unparseable", 0.0),
    "unbalanced": (r"\boxed{1+{2}", "unparseable", 0.0),
    "unclosed": ("\\boxed{42", "unparseable", 0.0),
    "garbage_1mb": ("\x00\\{}$%^&" * 125_000, "no_answer", 0.0),
    "garbage_1mb_then_box": ("qz" * 500_000 + r"\boxed{42}", "ok", 1.0),
    "box_then_1mb_open": ("\\boxed{" + "a{" * 500_000, "unparseable", 0.0),
    "unicode": ("\\boxed{π²√2 ☃ 四十二}", None, 0.0),
    "unicode_surrogates": ("\\boxed{\ud800\udfff}", None, 0.0),
    "empty": ("", "no_answer", 0.0),
    "empty_box": (r"\boxed{}", "unparseable", 0.0),
    "no_box": ("the answer is 42", "no_answer", 0.0),
    "escaped_brace": (r"\boxed{\{42\}}", None, None),
    "not_a_string": (None, "no_answer", 0.0),
}


def _check_row(name, reward, status, want_status, want_reward):
  assert status in answer_check.STATUSES, (name, status)
  assert reward in (0.0, 1.0), (name, reward)
  if want_status is not None:
    assert status == want_status, (name, status)
  if want_reward is not None:
    assert reward == want_reward, (name, reward)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_in_process_adversarial(name):
  text, want_status, want_reward = ADVERSARIAL[name]
  t0 = time.monotonic()
  reward, status = rewards.score_response(text, "42")
  elapsed = time.monotonic() - t0
  _check_row(name, reward, status, want_status, want_reward)
  # A guard against pathological parsing (minutes on a bad regex or sympy path), not a speed
  # test: 3.3 s was seen for an ordinary row on the loaded 2-core box.
  assert elapsed < 15, f"{name} took {elapsed:.2f}s"


def test_worker_pool_batch_adversarial_and_throughput():
  names = sorted(ADVERSARIAL)
  texts = [ADVERSARIAL[n][0] for n in names]
  with rewards.RewardScorer(rewards.RewardConfig(num_workers=2)) as scorer:
    t0 = time.monotonic()
    r, s = scorer.score_batch(texts, ["42"] * len(texts))
    elapsed = time.monotonic() - t0
    for name, reward, status in zip(names, r, s):
      _check_row(name, float(reward), status, *ADVERSARIAL[name][1:])
    # The slow items (towers) run in parallel and each is bounded by ~1 s.
    assert elapsed < 3 * 2.5, elapsed
    # A realistic batch: 64 prompts x 8 samples.
    batch = [f"Let me add. 17 + 25 = {40 + i % 5}. So \\boxed{{{40 + i % 5}}}" for i in range(512)]
    t0 = time.monotonic()
    r, s = scorer.score_batch(batch, ["42"] * 512)
    elapsed = time.monotonic() - t0
    print(f"512 answers through the worker pool: {elapsed:.3f}s")
    assert r.sum() == sum(1 for i in range(512) if i % 5 == 2)
    assert rewards.count_statuses(s)["ok"] == 512
    assert elapsed < 20.0


def test_hard_deadline_kills_a_stuck_worker_and_recovers():
  """math-verify's own alarms disabled in effect (30 s): only the deadline saves us."""
  check = answer_check.AnswerCheckConfig(parse_timeout_s=30, verify_timeout_s=30)
  cfg = rewards.RewardConfig(check=check, num_workers=1, item_deadline_s=1.0)
  with rewards.RewardScorer(cfg) as scorer:
    t0 = time.monotonic()
    r, s = scorer.score_batch([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{42}", r"\boxed{7}"],
                              ["42", "42", "7"])
    elapsed = time.monotonic() - t0
  assert s[0] == "timeout" and r[0] == 0.0
  assert list(r[1:]) == [1.0, 1.0] and s[1:] == ["ok", "ok"]
  assert elapsed < 30.0  # includes respawning the worker (imports math-verify)


def test_batch_and_status_counts():
  with rewards.RewardScorer(rewards.RewardConfig(num_workers=1)) as scorer:
    r, s = scorer.score_batch([r"\boxed{42}", "", r"\boxed{1+{", r"\boxed{3}"],
                              ["42", "1", "1", "4"])
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0, 0.0])
    counts = rewards.count_statuses(s)
    assert counts == {"ok": 2, "no_answer": 1, "unparseable": 1, "timeout": 0, "bad_gold": 0,
                      "error": 0}
    with pytest.raises(ValueError, match="len"):
      scorer.score_batch(["a"], [])


DEADLINE_SCRIPT = textwrap.dedent("""
    import json, threading, time
    import jax  # the process of issue 12: jax loaded, its GC callback installed
    from soft_grpo import answer_check, rewards
    # math-verify's own alarms at 30 s: only the worker deadline can stop the slow case.
    check = answer_check.AnswerCheckConfig(parse_timeout_s=30, verify_timeout_s=30)
    out = []
    def score():
      with rewards.RewardScorer(rewards.RewardConfig(check=check, num_workers=1,
                                                     item_deadline_s=1.0)) as scorer:
        for _ in range(2):
          t0 = time.monotonic()
          r, s = scorer.score_batch([r"\\boxed{9^{9^{9^{9}}}}"], ["42"])
          out.append((time.monotonic() - t0, s[0], float(r[0])))
    t = threading.Thread(target=score)   # not the main thread: no SIGALRM there
    t.start()
    t.join(120)
    print(json.dumps(out))
""")


@pytest.mark.parametrize("run", range(2))
def test_deadline_holds_in_a_fresh_process_off_the_main_thread(run):
  """Issue 12 item 4: the deadline cannot be swallowed (fresh process, jax loaded,
  scored from a non-main thread, where math-verify has no timeout at all)."""
  res = subprocess.run([sys.executable, "-c", DEADLINE_SCRIPT], capture_output=True,
                       text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep))))
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert len(out) == 2, res.stderr[-2000:]
  for i, (elapsed, status, reward) in enumerate(out):
    assert status == "timeout" and reward == 0.0
    # 1 s deadline (pebble checks about every 0.2 s); the second call also waits for the
    # killed worker's replacement to start (spawn + math-verify import), which is not
    # charged to the answer's deadline.
    assert 0.9 < elapsed < (3.0 if i == 0 else 20.0), (i, elapsed)


def test_works_off_the_main_thread():
  out = {}
  t = threading.Thread(target=lambda: out.update(r=rewards.score_response(r"\boxed{6}", "6")))
  t.start()
  t.join(10)
  assert out["r"] == (1.0, "ok")


def test_last_number_mode_and_gold_formats():
  cfg = answer_check.AnswerCheckConfig(answer_format="last_number")
  assert rewards.score_response("17 + 25 = 42", "42", cfg) == (1.0, "ok")
  assert rewards.score_response("it is 1,234 apples", "1234", cfg) == (1.0, "ok")
  assert rewards.score_response("no digits here", "1", cfg) == (0.0, "no_answer")
  assert rewards.score_response("x " + "9" * 1000, "9", cfg)[1] == "unparseable"
  # Gold answers in LaTeX, boxed or plain form.
  assert rewards.score_response(r"\boxed{0.5}", r"\frac{1}{2}") == (1.0, "ok")
  assert rewards.score_response(r"\boxed{\frac{1}{2}}", r"\boxed{0.5}") == (1.0, "ok")
  assert rewards.score_response(r"\boxed{3\sqrt{2}}", r"\sqrt{18}") == (1.0, "ok")


@pytest.mark.parametrize("kwargs, field", [
    (dict(answer_format="xml"), "answer_format"),
    (dict(max_answer_chars=0), "max_answer_chars"),
    (dict(max_brace_depth=-1), "max_brace_depth"),
    (dict(parse_timeout_s=0.5), "parse_timeout_s"),
])
def test_check_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    answer_check.AnswerCheckConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_workers=-1), "num_workers"),
    (dict(num_workers=0), "num_workers"),
    (dict(item_deadline_s=float("nan")), "item_deadline_s"),
    (dict(item_deadline_s=0), "item_deadline_s"),
    (dict(startup_timeout_s=-1), "startup_timeout_s"),
])
def test_reward_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=rf"^reward\.{field}: .*; allowed: "):
    rewards.RewardConfig(**kwargs)
