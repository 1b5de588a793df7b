"""Tokenizer: SmolLM2's GGUF-built tokenizer equals transformers' on hard strings; chat
templates render like HF's (sandboxed, raise_exception, tojson); save -> reload (ours and
transformers) is identical."""

import jinja2
import pytest

from common.tokenizer import Tokenizer

HARD_STRINGS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand blank lines\n",
    "naïve café, Straße,日本語のテキスト, emoji 🤗🚀, Ωmega",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "Numbers: 12345, 3.14159, -42, 1e-5, 2024-01-01, $1,000,000.",
    "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine; we've done it. DON'T",
    "",
]


def test_smollm2_tokenization_matches_transformers(smollm2_ours, smollm2_hf_tokenizer):
  tok = smollm2_ours[1]
  for text in HARD_STRINGS:
    for special in (True, False):
      assert tok.encode(text, add_special_tokens=special) == smollm2_hf_tokenizer.encode(
          text, add_special_tokens=special), text
    assert tok.decode(tok.encode(text)) == text
  # Special tokens stay whole; digits split one by one (SmolLM2's Digits pre-tokenizer).
  assert tok.encode("<|im_start|>")[0] == tok.token_id("<|im_start|>")
  assert len(tok.encode("12345")) == 5


def test_smollm2_chat_template_matches_transformers(smollm2_ours, smollm2_hf_tokenizer):
  tok = smollm2_ours[1]
  convs = [
      [{"role": "user", "content": "What is 17 + 25?"}],
      [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 🤗"},
       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
  ]
  for msgs in convs:
    for gen in (True, False):
      assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == (
          smollm2_hf_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                   add_generation_prompt=gen))
    assert tok.encode_chat(msgs) == smollm2_hf_tokenizer.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False)


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
  return Tokenizer(tok.backend, chat_template=template, bos_token=tok.bos_token,
                   eos_token=tok.eos_token, source="test")


def test_chat_template_helpers_and_sandbox(smollm2_ours):
  tok = smollm2_ours[1]
  raising = _with_template(tok, "{% if messages[0]['role'] != 'user' %}"
                                "{{ raise_exception('first message must be user') }}{% endif %}ok")
  assert raising.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
  with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be user"):
    raising.apply_chat_template([{"role": "system", "content": "x"}])
  # HF's tojson does not HTML-escape; bos/eos tokens are in scope; loopcontrols enabled.
  t = _with_template(tok, "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}"
                          "{% break %}{% endif %}{{ m | tojson }}{% endfor %}{{ eos_token }}")
  out = t.apply_chat_template([{"role": "user", "content": "<b>&'é"}, {"role": "x"}])
  assert out == '<|im_start|>{"role": "user", "content": "<b>&\'é"}<|im_end|>'
  evil = _with_template(tok, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    evil.apply_chat_template([{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="no chat template"):
    _with_template(tok, None).apply_chat_template([{"role": "user", "content": "x"}])


def test_token_id(smollm2_ours):
  tok = smollm2_ours[1]
  assert tok.token_id("<|endoftext|>") == 0 and tok.token_id("<|im_start|>") == 1
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.token_id("<definitely-not-a-token>")


def test_save_reload_ours_and_transformers(smollm2_ours, tmp_path):
  from transformers import AutoTokenizer

  tok = smollm2_ours[1]
  tok.save(tmp_path)
  again = Tokenizer.from_hf_dir(tmp_path)
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  for text in HARD_STRINGS:
    assert again.encode(text) == tok.encode(text) == hf.encode(text), text
    assert hf.decode(tok.encode(text)) == text
  assert (again.bos_id, again.eos_id, again.eos_ids) == (tok.bos_id, tok.eos_id, tok.eos_ids)
  msgs = [{"role": "user", "content": "What is 17 + 25?"}]
  assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs) == (
      hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
