"""The one prompt builder: suffix, styles, chat template, think-end pieces."""

import re

import pytest

from common.tokenizer import ByteTokenizer
from soft_grpo import prompts


class TemplateTokenizer(ByteTokenizer):
  chat_template = "unused: apply_chat_template is overridden"

  def apply_chat_template(self, messages, add_generation_prompt=True):
    body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
    return body + ("<assistant>" if add_generation_prompt else "")


def test_prompt_suffix():
  p = prompts.format_prompt("What is 17 + 25?  ")
  assert p == ("What is 17 + 25? Let's think step by step and output the final answer "
               "within \\boxed{}.")
  assert re.search(r"\\boxed\{\}\.$", p)


def test_styles():
  tok = ByteTokenizer()
  dec = lambda ids: tok.decode(ids)
  assert dec(prompts.build_prompt(tok, "1+2", "bare")) == "1+2="
  plain = dec(prompts.build_prompt(tok, "1+2", "plain"))
  assert plain == prompts.format_prompt("1+2") + "\n<think>\n"
  # No chat template: "chat" falls back to the plain prompt.
  assert dec(prompts.build_prompt(tok, "1+2", "chat")) == plain
  chat = dec(prompts.build_prompt(TemplateTokenizer(), "1+2", "chat"))
  assert chat == (f"<system>{prompts.THINK_SYSTEM}</system><user>{prompts.format_prompt('1+2')}"
                  "</user><assistant><think>\n")
  with pytest.raises(ValueError, match=r"^task\.prompt: got 'xml'; allowed: "):
    prompts.build_prompt(tok, "1+2", "xml")


def test_think_end_ids():
  tok = ByteTokenizer()
  assert prompts.think_end_ids(tok) == tuple(tok.encode("</think>"))
  with pytest.raises(ValueError, match=r"^rollout\.think_end: "):
    prompts.think_end_ids(tok, "")
