"""A corpus as two flat token streams (train, val), the input of the packing pipeline.

`load_token_corpus(source, ...)` resolves a source name ("stdlib", "synthetic", or a corpus
path; see `common.data.corpus`), builds the tokenizer, and tokenizes each split into one 1-D
array: the documents of the split in sorted-id order, each followed by `eos_id`. With a
`cache_dir`, the arrays are written once as `.npy` (key: corpus fingerprint, split, val
fraction, tokenizer id) and later memory-mapped, so a large corpus is tokenized once and not
held in RAM.

"synthetic" needs no tokenizer: train and val are two independent samples (different
seeds) of the same Markov chain (`common.data.synthetic`), over `vocab_size` tokens, with no
EOS (`eos_id` None).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from common.data import corpus as corpus_lib
from common.data import synthetic
from common import tokenizer as tok_lib

_ENCODE_BATCH = 64


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  name: str
  train: np.ndarray                 # [N_train] token ids (uint16 or int32; maybe a memmap)
  val: np.ndarray                   # [N_val]
  vocab_size: int
  eos_id: int | None                # separator between documents; None for "synthetic"
  tokenizer: Any | None              # a common.tokenizer kind; None for "synthetic"


def _dtype_for(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.int32


def tokenize_documents(texts, tokenizer) -> np.ndarray:
  """Concatenates encode(text) + [eos_id] over texts into one 1-D array."""
  dtype = _dtype_for(tokenizer.vocab_size)
  eos = np.asarray([tokenizer.eos_id], dtype)
  parts = []
  if isinstance(tokenizer, tok_lib.ByteTokenizer):
    for text in texts:
      parts.append(np.frombuffer(text.encode("utf-8"), np.uint8).astype(dtype))
      parts.append(eos)
  else:
    batch_encode = getattr(tokenizer, "encode_batch", None)
    buf = []

    def flush():
      encoded = (batch_encode(buf, add_special_tokens=False) if batch_encode else
                 [tokenizer.encode(t, add_special_tokens=False) for t in buf])
      for ids in encoded:
        parts.append(np.asarray(ids, dtype))
        parts.append(eos)
      buf.clear()

    for text in texts:
      buf.append(text)
      if len(buf) >= _ENCODE_BATCH:
        flush()
    if buf:
      flush()
  if not parts:
    return np.zeros((0,), dtype)
  return np.concatenate(parts)


def _cached_split(corpus: corpus_lib.TextCorpus, split: str, val_fraction: float,
                  tokenizer, cache_dir: str | None) -> np.ndarray:
  def build():
    return tokenize_documents((t for _, t in corpus.documents(split, val_fraction)), tokenizer)

  if cache_dir is None:
    return build()
  key = json.dumps([corpus.fingerprint, split, val_fraction, tokenizer.cache_id, "v1"])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  path = os.path.join(cache_dir, f"tokens-{split}-{digest}.npy")
  if not os.path.isfile(path):
    arr = build()
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
      np.save(f, arr)
    os.replace(tmp, path)
  return np.load(path, mmap_mode="r")


def load_token_corpus(source: str = "stdlib", *, tokenizer: str = "byte",
                      vocab_size: int = tok_lib.SP_DEFAULT_VOCAB, val_fraction: float = 0.05,
                      cache_dir: str | None = None,
                      sp_sample_chars: int = tok_lib.SP_DEFAULT_SAMPLE_CHARS,
                      synthetic_order: int = 3, synthetic_tokens: int = 2_000_000,
                      synthetic_branching: int = 4, synthetic_concentration: float = 0.5,
                      synthetic_seed: int = 0) -> TokenCorpus:
  """Train/val token streams of `source` (see the module docstring).

  vocab_size: the SentencePiece vocab for tokenizer="sentencepiece"; the alphabet for
  source="synthetic"; ignored otherwise. `cache_dir` holds trained SentencePiece models
  (default `common.tokenizer.default_cache_dir()`) and, when given, the token arrays.
  Raises one-line ValueErrors for an unknown source, a missing path or an empty corpus.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
  if source == "synthetic":
    chain = synthetic.make_markov_chain(
        vocab_size, synthetic_order, branching=synthetic_branching,
        concentration=synthetic_concentration, seed=synthetic_seed)
    num_val = max(int(synthetic_tokens * val_fraction), 1)
    train = synthetic.sample_markov_tokens(chain, synthetic_tokens, seed=2 * synthetic_seed)
    val = synthetic.sample_markov_tokens(chain, num_val, seed=2 * synthetic_seed + 1)
    dtype = _dtype_for(vocab_size)
    return TokenCorpus(name="synthetic", train=train.astype(dtype), val=val.astype(dtype),
                       vocab_size=vocab_size, eos_id=None, tokenizer=None)
  text_corpus = corpus_lib.open_corpus(source)
  if not text_corpus.doc_ids:
    raise ValueError(f"data source {source!r}: the corpus is empty (no documents)")
  tok = tok_lib.make_tokenizer(tokenizer, corpus=text_corpus, vocab_size=vocab_size,
                               cache_dir=cache_dir, sample_chars=sp_sample_chars)
  train = _cached_split(text_corpus, "train", val_fraction, tok, cache_dir)
  if train.size == 0:
    raise ValueError(f"data source {source!r}: the corpus is empty (no readable UTF-8 text "
                     "in the train split)")
  val = _cached_split(text_corpus, "val", val_fraction, tok, cache_dir)
  return TokenCorpus(name=source, train=train, val=val, vocab_size=tok.vocab_size,
                     eos_id=tok.eos_id, tokenizer=tok)
