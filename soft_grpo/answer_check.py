"""Extract, screen and verify a model's final answer (stdlib + math-verify only).

Model text is untrusted input.  `rewards.py` runs `verify_answer` in worker
processes, which are killed when they overrun their deadline.

Layers of defence, cheapest first:
  1. only the last `max_text_chars` characters are examined (the answer is at
     the end); the last `\\boxed{` is found with `str.rfind` (linear, in C);
  2. the balanced-brace scan stops after `max_answer_chars` characters;
  3. screening rejects over-deep brace nesting and over-long digit runs
     before any parser sees them;
  4. math-verify's own `parsing_timeout` / `timeout_seconds` (SIGALRM, main
     thread only) bound parsing and comparison;
  5. the caller's worker-process deadline bounds everything else (C-level
     big-integer arithmetic cannot be interrupted by a signal).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading

from soft_grpo import validate as v

STATUS_OK = "ok"                    # verified (reward 1 or 0 by the answer)
STATUS_NO_ANSWER = "no_answer"      # no \boxed{ (or no number) in the text
STATUS_UNPARSEABLE = "unparseable"  # malformed, too long/deep, or parser found nothing
STATUS_TIMEOUT = "timeout"          # parser/verifier ran out of time
STATUS_BAD_GOLD = "bad_gold"        # the reference answer itself did not parse
STATUS_ERROR = "error"              # anything else (worker crash, parser bug)
STATUSES = (STATUS_OK, STATUS_NO_ANSWER, STATUS_UNPARSEABLE, STATUS_TIMEOUT,
            STATUS_BAD_GOLD, STATUS_ERROR)

ANSWER_FORMATS = ("boxed", "last_number")

_BOXED = "\\boxed{"
_DIGIT_RUN = re.compile(r"\d+")
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class AnswerCheckConfig:
  """Limits on untrusted model text; every value is a config field."""
  answer_format: str = "boxed"     # "boxed": last \boxed{...}; "last_number"
  max_text_chars: int = 4_000_000  # only this many trailing chars are examined
  max_answer_chars: int = 256      # longer answers are "unparseable"
  max_brace_depth: int = 8         # deeper {...} nesting is "unparseable"
  max_number_digits: int = 64      # a longer digit run is "unparseable"
  parse_timeout_s: int = 1         # math-verify parsing_timeout (whole seconds)
  verify_timeout_s: int = 1        # math-verify timeout_seconds (whole seconds)

  def __post_init__(self):
    v.check_choice("reward.check", "answer_format", self.answer_format, ANSWER_FORMATS)
    for name in ("max_text_chars", "max_answer_chars", "max_brace_depth",
                 "max_number_digits", "parse_timeout_s", "verify_timeout_s"):
      v.check_int("reward.check", name, getattr(self, name), 1)


def extract_last_boxed(text: str, config: AnswerCheckConfig) -> tuple[str | None, str]:
  """Content of the last balanced `\\boxed{...}` -> (content, status)."""
  tail = text[-config.max_text_chars:]
  start = tail.rfind(_BOXED)
  if start < 0:
    return None, STATUS_NO_ANSWER
  i = start + len(_BOXED)
  depth, max_depth = 1, 1
  end = min(len(tail), i + config.max_answer_chars + 1)
  j = i
  while j < end:
    ch = tail[j]
    if ch == "\\" and j + 1 < end:
      j += 2  # skip escaped characters such as \{ and \}
      continue
    if ch == "{":
      depth += 1
      max_depth = max(max_depth, depth)
    elif ch == "}":
      depth -= 1
      if depth == 0:
        content = tail[i:j]
        if max_depth - 1 > config.max_brace_depth:
          return None, STATUS_UNPARSEABLE
        return content, STATUS_OK
    j += 1
  # Unbalanced, or longer than max_answer_chars.
  return None, STATUS_UNPARSEABLE


def extract_last_number(text: str, config: AnswerCheckConfig) -> tuple[str | None, str]:
  """The last number in the text (commas removed) -> (number, status)."""
  tail = text[-config.max_text_chars:]
  last = None
  for last in _NUMBER.finditer(tail):
    pass
  if last is None:
    return None, STATUS_NO_ANSWER
  number = last.group(0).replace(",", "")
  if len(number) > config.max_number_digits + 2:
    return None, STATUS_UNPARSEABLE
  return number, STATUS_OK


def screen(answer: str, config: AnswerCheckConfig) -> str:
  """Cheap rejection of inputs that could make the parser slow."""
  if not answer.strip():
    return STATUS_UNPARSEABLE
  if len(answer) > config.max_answer_chars:
    return STATUS_UNPARSEABLE
  depth = max_depth = 0
  for ch in answer:
    if ch == "{":
      depth += 1
      max_depth = max(max_depth, depth)
    elif ch == "}":
      depth -= 1
  if max_depth > config.max_brace_depth:
    return STATUS_UNPARSEABLE
  for run in _DIGIT_RUN.finditer(answer):
    if len(run.group(0)) > config.max_number_digits:
      return STATUS_UNPARSEABLE
  return STATUS_OK


def extract_answer(text, config: AnswerCheckConfig) -> tuple[str | None, str]:
  """Extract per `config.answer_format`, then screen."""
  if not isinstance(text, str) or not text:
    return None, STATUS_NO_ANSWER
  if config.answer_format == "boxed":
    answer, status = extract_last_boxed(text, config)
  else:
    answer, status = extract_last_number(text, config)
  if answer is None:
    return None, status
  status = screen(answer, config)
  return (answer if status == STATUS_OK else None), status


# ----------------------------------------------------------------------------
# math-verify.
# ----------------------------------------------------------------------------


def _timeouts(config: AnswerCheckConfig) -> tuple[int | None, int | None]:
  # math-verify's timeouts use SIGALRM, which only works on the main thread;
  # elsewhere we rely on the screening and the worker-process deadline.
  if threading.current_thread() is threading.main_thread():
    return config.parse_timeout_s, config.verify_timeout_s
  return None, None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, parse_timeout: int | None):
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
  gold = gold.strip()
  attempts = [gold] if "\\boxed" in gold else ["\\boxed{" + gold + "}", "$" + gold + "$"]
  for candidate in attempts:
    parsed = parse(candidate, extraction_config=[
        LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                   parsing_timeout=parse_timeout, raise_on_error=False)
    if parsed:
      return parsed
  return parse(gold, extraction_config=[ExprExtractionConfig()],
               parsing_timeout=parse_timeout, raise_on_error=False)


def verify_answer(answer: str, gold: str, config: AnswerCheckConfig) -> tuple[float, str]:
  """math-verify an extracted, screened answer against the reference answer."""
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
  from math_verify.errors import TimeoutException
  parse_timeout, verify_timeout = _timeouts(config)
  try:
    gold_parsed = _parse_gold(str(gold), parse_timeout)
  except Exception:
    return 0.0, STATUS_BAD_GOLD
  if not gold_parsed:
    return 0.0, STATUS_BAD_GOLD
  try:
    if config.answer_format == "boxed":
      pred = parse("\\boxed{" + answer + "}", extraction_config=[
          LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                   parsing_timeout=parse_timeout, raise_on_error=True)
    else:
      pred = parse(answer, extraction_config=[ExprExtractionConfig()],
                   parsing_timeout=parse_timeout, raise_on_error=True)
  except TimeoutException:
    return 0.0, STATUS_TIMEOUT
  except (Exception, RecursionError):  # Untrusted input: a parse failure scores 0.
    return 0.0, STATUS_UNPARSEABLE
  if not pred:
    return 0.0, STATUS_UNPARSEABLE
  try:
    ok = verify(gold_parsed, pred, timeout_seconds=verify_timeout,
                raise_on_error=True)
  except TimeoutException:
    return 0.0, STATUS_TIMEOUT
  except Exception:
    return 0.0, STATUS_ERROR
  return (1.0 if ok else 0.0), STATUS_OK


def check(text, gold, config: AnswerCheckConfig) -> tuple[float, str]:
  """Reward and status for one response, in this process.  Never raises."""
  try:
    answer, status = extract_answer(text, config)
    if answer is None:
      return 0.0, status
    return verify_answer(answer, gold, config)
  except Exception:
    return 0.0, STATUS_ERROR
  except BaseException as e:  # math-verify's TimeoutException is a BaseException.
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
      raise
    return 0.0, STATUS_TIMEOUT
