"""Tokenizer: SmolLM2's GGUF-built tokenizer equals transformers' on hard strings; chat
templates render like HF's (sandboxed, raise_exception, tojson); save -> reload (ours and
transformers) is identical. The LM data kinds: byte-level exact round trip, SentencePiece
trained + cached, a bare HF tokenizer.json."""

import inspect
import json
import os

import jinja2
import numpy as np
import pytest

from common.data import load_token_corpus, open_corpus
from common.tokenizer import (ByteTokenizer, SentencePieceTokenizer, Tokenizer, make_tokenizer,
                              train_sentencepiece)

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


# ----------------------------------------------------------- the LM data kinds ---

LM_SAMPLES = [
    "def f(x):\n    \"\"\"Doc.\"\"\"\n\n\treturn  x  + 1  # trailing  \n",
    "  leading spaces, naïve café, Straße, 日本語, emoji 😀 and \x00 NUL",
    "",
]


@pytest.fixture(scope="module")
def code_folder(tmp_path_factory):
  """About 300 KB of real text (stdlib sources), as a folder corpus."""
  import argparse, collections, dataclasses as dc, json as js, textwrap, typing  # noqa: E401
  root = tmp_path_factory.mktemp("code")
  for mod in (argparse, collections, dc, js, textwrap, typing, inspect):
    (root / f"{mod.__name__}.py").write_text(inspect.getsource(mod), encoding="utf-8")
  return str(root)


def test_byte_tokenizer_round_trip_exact():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (258, 256, 257, None)
  assert tok.eos_ids == (256,) and tok.chat_template is None
  for s in LM_SAMPLES:
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s
    assert tok.encode(s, add_special_tokens=True) == ids     # no BOS to add
  assert tok.decode([104, 256], skip_special_tokens=False) == "h"
  assert tok.decode([104, 256, 105, 257]) == "hi"  # specials are dropped


def test_sentencepiece_trained_cached_and_round_trips(code_folder, tmp_path, monkeypatch):
  import sentencepiece as spm
  corpus = open_corpus(code_folder)
  cache = str(tmp_path / "spcache")
  path = train_sentencepiece(corpus, vocab_size=600, cache_dir=cache, sample_chars=200_000)
  assert os.path.isfile(path) and os.path.dirname(path) == cache
  tok = SentencePieceTokenizer(path)
  assert 300 < tok.vocab_size <= 600 and tok.eos_id == 2
  for s in LM_SAMPLES + [corpus.read("textwrap.py")[:3000]]:
    assert tok.decode(tok.encode(s)) == s
  text = corpus.read("argparse.py")
  assert len(tok.encode(text)) < 0.5 * len(text.encode())   # it learned real pieces

  # Second call: loaded from the cache, the trainer is not run.
  def boom(**_):
    raise AssertionError("retrained instead of loading the cache")
  monkeypatch.setattr(spm.SentencePieceTrainer, "train", boom)
  again = make_tokenizer("sentencepiece", corpus=corpus, vocab_size=600, cache_dir=cache,
                         sample_chars=200_000)
  assert again.model_path == path and again.encode(text) == tok.encode(text)
  # The key includes the vocab size (and the corpus fingerprint): another size retrains.
  with pytest.raises(AssertionError, match="retrained"):
    train_sentencepiece(corpus, vocab_size=700, cache_dir=cache, sample_chars=200_000)


def test_sentencepiece_token_corpus(code_folder, tmp_path):
  tc = load_token_corpus(code_folder, tokenizer="sentencepiece", vocab_size=600,
                         cache_dir=str(tmp_path), sp_sample_chars=100_000, val_fraction=0.3)
  assert tc.vocab_size == tc.tokenizer.vocab_size and tc.eos_id == 2
  assert tc.train.max() < tc.vocab_size and tc.val.size > 0
  first = tc.tokenizer.decode(tc.train[:np.argmax(tc.train == 2)])
  assert first == open_corpus(code_folder).read(
      open_corpus(code_folder).split_ids("train", 0.3)[0])


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
  tok = Backend(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([s for s in LM_SAMPLES if s] * 10, trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  hf = make_tokenizer(path)
  assert isinstance(hf, Tokenizer) and hf.eos_id == tok.token_to_id("</s>")
  assert hf.vocab_size == tok.get_vocab_size()
  for s in LM_SAMPLES:
    assert hf.decode(hf.encode(s)) == s
  # eos_token from a tokenizer_config.json beside it wins
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": {"content": "<unk>"}}, f)
  assert make_tokenizer(str(tmp_path)).eos_id == tok.token_to_id("<unk>")


def test_unknown_tokenizer():
  with pytest.raises(ValueError, match="^tokenizer: unknown tokenizer 'wordpiece'"):
    make_tokenizer("wordpiece")
  with pytest.raises(ValueError, match="needs a text corpus"):
    make_tokenizer("sentencepiece")
