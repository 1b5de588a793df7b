"""The one prompt builder of SofT-GRPO: problem text -> prompt token ids.

Styles:
  chat   the tokenizer's chat template with a system message asking for <think> ... </think>
         then \\boxed{}; the user turn is the problem + the official suffix; the assistant
         turn is opened with "<think>\\n" so every rollout starts in the thinking phase.
         Tokenizers without a template get the plain style.
  plain  "<problem> <suffix>\\n<think>\\n" (no template).
  bare   "<problem>=" (tiny random test models).
"""

from __future__ import annotations

from typing import Callable

# Official prompt suffix (SofT-GRPO / DeepScaleR data preprocessing).
PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
THINK_SYSTEM = ("You are a helpful assistant. First think about the problem inside "
                "<think> </think> tags, then give the final answer within \\boxed{}.")
THINK_OPEN = "<think>\n"


def format_prompt(problem: str) -> str:
  """Problem text followed by the official instruction suffix."""
  return f"{problem.rstrip()} {PROMPT_SUFFIX}"


def _plain(tokenizer, problem: str) -> list[int]:
  return tokenizer.encode(f"{format_prompt(problem)}\n{THINK_OPEN}", add_special_tokens=False)


def _chat(tokenizer, problem: str) -> list[int]:
  if not getattr(tokenizer, "chat_template", None):
    return _plain(tokenizer, problem)
  text = tokenizer.apply_chat_template(
      [{"role": "system", "content": THINK_SYSTEM},
       {"role": "user", "content": format_prompt(problem)}], add_generation_prompt=True)
  return tokenizer.encode(text + THINK_OPEN, add_special_tokens=False)


def _bare(tokenizer, problem: str) -> list[int]:
  return tokenizer.encode(f"{problem}=", add_special_tokens=False)


PROMPT_STYLES: dict[str, Callable] = {"chat": _chat, "plain": _plain, "bare": _bare}


def build_prompt(tokenizer, problem: str, style: str = "chat") -> list[int]:
  """Prompt token ids of `problem` in `style` (one of `PROMPT_STYLES`)."""
  if style not in PROMPT_STYLES:
    raise ValueError(f"task.prompt: got {style!r}; allowed: {sorted(PROMPT_STYLES)}")
  return PROMPT_STYLES[style](tokenizer, problem)


def think_end_ids(tokenizer, think_end: str = "</think>") -> tuple[int, ...]:
  """All token pieces of the think-end string; detection uses the last one."""
  ids = tuple(int(i) for i in tokenizer.encode(think_end, add_special_tokens=False))
  if not ids:
    raise ValueError(f"rollout.think_end: {think_end!r} encodes to no tokens; allowed: a "
                     "string the tokenizer encodes to at least one token")
  return ids
