"""Tokenizers for the LM experiments, behind one small interface.

  encode(text) -> list[int]     no special tokens added
  decode(ids) -> str            special tokens dropped
  vocab_size: int               ids are in [0, vocab_size)
  eos_id: int                   the document separator written between packed documents
  cache_id: str                 identifies the tokenizer in cache keys of token arrays

Kinds (`make_tokenizer(name, ...)`):
  "byte"           UTF-8 bytes: ids 0..255 are the bytes, 256 = EOS, 257 = PAD; vocab 258.
                   Exact round trip for any text.
  "sentencepiece"  a SentencePiece unigram model trained on a sample of the corpus (default
                   vocab 10K, as in the LS-attention paper) and cached on disk under a key of
                   (corpus fingerprint, vocab size, sample size, trainer options). Identity
                   normalization, no dummy prefix and byte fallback make the round trip exact
                   for code (indentation, newlines, any Unicode). Specials: unk 0, bos 1,
                   eos 2, pad 3.
  a path           an HF `tokenizer.json` (the `tokenizers` library); EOS is `eos_token`
                   from a `tokenizer_config.json` beside it, else the first known EOS-like token.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Protocol, Sequence

from common.data.corpus import TextCorpus

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 258

SP_UNK_ID, SP_BOS_ID, SP_EOS_ID, SP_PAD_ID = 0, 1, 2, 3
SP_DEFAULT_VOCAB = 10_000
SP_DEFAULT_SAMPLE_CHARS = 1_000_000
_SP_SENTENCE_CHARS = 2_000         # training "sentences": corpus cut into pieces this long
_SP_OPTIONS_VERSION = "v1"         # bump when the trainer options below change

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>",
                   "<|im_end|>", "[SEP]")


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  cache_id: str

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus EOS (256) and PAD (257)."""
  vocab_size = BYTE_VOCAB_SIZE
  eos_id = BYTE_EOS_ID
  pad_id = BYTE_PAD_ID
  cache_id = "byte-v1"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model (see `train_sentencepiece`)."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(model_path):
      raise ValueError(f"sentencepiece model: no such file {model_path!r}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    with open(model_path, "rb") as f:
      self.cache_id = "sp-" + hashlib.sha256(f.read()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """Any HF `tokenizer.json`, through the `tokenizers` library."""

  def __init__(self, path: str, eos_token: str | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer: no such tokenizer.json {path!r}")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    if eos_token is None:
      eos_token = _eos_from_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    candidates = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
    ids = [self._tok.token_to_id(t) for t in candidates]
    ids = [i for i in ids if i is not None]
    if not ids:
      raise ValueError(f"tokenizer {path!r}: no EOS token found (tried {list(candidates)}); "
                       "pass eos_token")
    self.eos_id = int(ids[0])
    with open(path, "rb") as f:
      self.cache_id = f"hf-{hashlib.sha256(f.read()).hexdigest()[:16]}-eos{self.eos_id}"

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _eos_from_config(config_path: str) -> str | None:
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding="utf-8") as f:
    tok = json.load(f).get("eos_token")
  if isinstance(tok, dict):
    tok = tok.get("content")
  return tok if isinstance(tok, str) else None


def default_cache_dir() -> str:
  """$LS_DATA_CACHE, else $XDG_CACHE_HOME/ls_softgrpo/data, else ~/.cache/ls_softgrpo/data."""
  if os.environ.get("LS_DATA_CACHE"):
    return os.environ["LS_DATA_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ls_softgrpo", "data")


def sentencepiece_cache_path(corpus: TextCorpus, vocab_size: int, sample_chars: int,
                             cache_dir: str) -> str:
  key = json.dumps([corpus.fingerprint, vocab_size, sample_chars, _SP_OPTIONS_VERSION])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"spm-{vocab_size}-{digest}.model")


def train_sentencepiece(corpus: TextCorpus, *, vocab_size: int = SP_DEFAULT_VOCAB,
                        cache_dir: str | None = None,
                        sample_chars: int = SP_DEFAULT_SAMPLE_CHARS,
                        num_threads: int = 2) -> str:
  """Trains (or loads from cache) a SentencePiece model on a sample of `corpus`; its path.

  The sample is `corpus.sample_text(sample_chars)` (documents in id-hash order), so training
  takes seconds whatever the corpus size. The model file is written atomically.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size < 300:
    raise ValueError(f"vocab_size: SentencePiece with byte fallback needs >= 300, got {vocab_size}")
  cache_dir = cache_dir or default_cache_dir()
  path = sentencepiece_cache_path(corpus, vocab_size, sample_chars, cache_dir)
  if os.path.isfile(path):
    return path
  texts = corpus.sample_text(sample_chars)
  sentences = [t[i:i + _SP_SENTENCE_CHARS] for t in texts
               for i in range(0, len(t), _SP_SENTENCE_CHARS)]
  if not sentences:
    raise ValueError(f"data source {corpus.name!r}: the corpus is empty (no readable UTF-8 text)")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", byte_fallback=True, character_coverage=0.9995,
      # Code and prose both round-trip exactly: no NFKC, keep all whitespace, no "▁" prefix.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID, pad_id=SP_PAD_ID,
      hard_vocab_limit=False, max_sentence_length=4 * _SP_SENTENCE_CHARS + 16,
      num_threads=num_threads, minloglevel=2)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return path


TOKENIZER_KINDS = ("byte", "sentencepiece")


def make_tokenizer(name: str = "byte", *, corpus: TextCorpus | None = None,
                   vocab_size: int = SP_DEFAULT_VOCAB, cache_dir: str | None = None,
                   sample_chars: int = SP_DEFAULT_SAMPLE_CHARS) -> Tokenizer:
  """"byte" | "sentencepiece" (trained on `corpus`, cached) | path to an HF tokenizer.json."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    if corpus is None:
      raise ValueError("tokenizer 'sentencepiece': needs a text corpus to train on")
    return SentencePieceTokenizer(train_sentencepiece(
        corpus, vocab_size=vocab_size, cache_dir=cache_dir, sample_chars=sample_chars))
  if isinstance(name, str) and (name.endswith(".json") or os.path.isdir(name)):
    return HFTokenizer(name)
  raise ValueError(f"tokenizer: unknown tokenizer {name!r}; choose one of "
                   f"{list(TOKENIZER_KINDS)} or a path to an HF tokenizer.json")
