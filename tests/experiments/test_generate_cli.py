"""experiments.generate: bad sampling flags are one line each, before any model loads."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("flag, message", [
    ("--max_new_tokens=0", "error: sampling.max_new_tokens: got 0; allowed: an int >= 1"),
    ("--top_p=0", "error: sampling.top_p: got 0.0; allowed: (0, 1] (1: off)"),
    ("--top_p=1.5", "error: sampling.top_p: got 1.5; allowed: (0, 1] (1: off)"),
    ("--top_k=-3", "error: sampling.top_k: got -3; allowed: an int >= 0 (0: off)"),
    ("--temperature=nan", "error: sampling.temperature: got nan; allowed: a finite number > 0 "
                          "(or greedy)"),
])
def test_bad_sampling_flags_are_one_line(flag, message):
  # --model points nowhere: the flag error must come first, without loading anything.
  proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--model=/nonexistent",
                         flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [message]
