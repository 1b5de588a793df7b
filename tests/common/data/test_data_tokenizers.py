"""Tokenizers: byte-level exact round trip, SentencePiece trained + cached, HF tokenizer.json."""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest

from common.data import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_token_corpus,
                         make_tokenizer, open_corpus, train_sentencepiece)

SAMPLES = [
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
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
  for s in SAMPLES:
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s
  assert tok.decode([104, 256, 105, 257]) == "hi"  # specials are dropped


def test_sentencepiece_trained_cached_and_round_trips(code_folder, tmp_path, monkeypatch):
  import sentencepiece as spm
  corpus = open_corpus(code_folder)
  cache = str(tmp_path / "spcache")
  path = train_sentencepiece(corpus, vocab_size=600, cache_dir=cache, sample_chars=200_000)
  assert os.path.isfile(path) and os.path.dirname(path) == cache
  tok = SentencePieceTokenizer(path)
  assert 300 < tok.vocab_size <= 600 and tok.eos_id == 2
  for s in SAMPLES + [corpus.read("textwrap.py")[:3000]]:
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
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([s for s in SAMPLES if s] * 10, trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  hf = make_tokenizer(path)
  assert isinstance(hf, HFTokenizer) and hf.eos_id == tok.token_to_id("</s>")
  assert hf.vocab_size == tok.get_vocab_size()
  for s in SAMPLES:
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
