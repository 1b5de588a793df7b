"""The one tokenizer module: every tokenizer of the house, behind one interface.

  encode(text, add_special_tokens=...) -> list[int]
  decode(ids, skip_special_tokens=...) -> str
  vocab_size, eos_id, eos_ids, bos_id, pad_id, chat_template, cache_id

Kinds:
  Tokenizer               a `tokenizers.Tokenizer` plus special ids and the chat template,
                          from an HF checkpoint (`from_hf_dir`), a bare tokenizer.json
                          (`from_file`) or GGUF metadata (`common.weights.gguf`).
  ByteTokenizer           UTF-8 bytes: ids 0..255 are the bytes, 256 = EOS, 257 = PAD (no BOS);
                          vocab 258. Exact round trip. The LM data path and the tiny random
                          RL test models both use it.
  SentencePieceTokenizer  a unigram model trained on a sample of a corpus and cached
                          (`train_sentencepiece`; default vocab 10K as in the LS-attention
                          paper). Specials: unk 0, bos 1, eos 2, pad 3.
`make_tokenizer(name, ...)` picks one for the LM data path: "byte", "sentencepiece" or a
path to an HF tokenizer.json (file or folder).

Chat templates are rendered the way transformers renders them (`utils/chat_template_utils.py`):
an `ImmutableSandboxedEnvironment` with trim_blocks/lstrip_blocks, loopcontrols, a
non-HTML-escaping `tojson`, `raise_exception` and `strftime_now`, with the special tokens
(`bos_token`, `eos_token`, ...) in scope.

Encoding a rendered chat: use `encode_chat` (or `encode(text, add_special_tokens=False)`),
because the template already writes BOS where the model wants one. `encode` also never
doubles a BOS that the text already starts with.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import tokenizers

from common.weights.errors import WeightFileNotFoundError, WeightLoadError

if TYPE_CHECKING:
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


def _token_content(tok) -> str | None:
  """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
  if tok is None or isinstance(tok, str):
    return tok
  if isinstance(tok, dict):
    return tok.get("content")
  return None


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; HF's does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


class Tokenizer:
  """Text <-> token ids, special ids, and chat-template rendering."""

  def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
               bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, unk_token: str | None = None,
               extra_eos_ids: Iterable[int] = (), add_bos_token: bool = False,
               source: str = "<memory>"):
    self.backend = backend
    self.chat_template = chat_template
    self.bos_token = bos_token
    self.eos_token = eos_token
    self.pad_token = pad_token
    self.unk_token = unk_token
    self.add_bos_token = add_bos_token
    self.source = source
    self.bos_id = self._maybe_id(bos_token)
    self.eos_id = self._maybe_id(eos_token)
    self.pad_id = self._maybe_id(pad_token)
    eos = [] if self.eos_id is None else [self.eos_id]
    for i in extra_eos_ids:
      if i is not None and int(i) not in eos:
        eos.append(int(i))
    # Every id that ends a turn (Llama-3 has several; generation_config.json lists them).
    self.eos_ids: tuple[int, ...] = tuple(eos)

  # ----- ids -----------------------------------------------------------------------------------
  def _maybe_id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @functools.cached_property
  def cache_id(self) -> str:
    """Identifies the tokenizer (vocab, merges, EOS) in cache keys of token arrays."""
    digest = hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]
    return f"hf-{digest}-eos{self.eos_id}"

  def token_id(self, token: str) -> int:
    """The id of one token string, e.g. `token_id("<|im_end|>")`; ValueError if unknown."""
    i = self.backend.token_to_id(token)
    if i is None:
      raise ValueError(f"Tokenizer: token {token!r} is not in the vocabulary of {self.source}")
    return i

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(int(i))

  # ----- text ----------------------------------------------------------------------------------
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
    # A rendered chat template may already start with BOS; HF would double it, we do not.
    if (add_special_tokens and self.bos_id is not None and len(ids) >= 2
        and ids[0] == ids[1] == self.bos_id and self.bos_token and text.startswith(self.bos_token)):
      ids = ids[1:]
    return ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    if not add_special_tokens:   # no BOS to de-duplicate: the backend's parallel encoder
      return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
    return [self.encode(t, add_special_tokens) for t in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # ----- chat ----------------------------------------------------------------------------------
  def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """The conversation rendered to text by the model's own Jinja chat template."""
    if not self.chat_template:
      raise ValueError(f"Tokenizer: {self.source} has no chat template")
    specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token), ("unk_token", self.unk_token))
                if v is not None}
    return _compile_chat_template(self.chat_template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
        **{**specials, **kwargs})

  def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                  **kwargs) -> list[int]:
    """Token ids of the rendered chat (no extra BOS: the template writes what it needs)."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                       add_special_tokens=False)

  # ----- files ---------------------------------------------------------------------------------
  def save(self, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json (loadable by us and by transformers)."""
    os.makedirs(out_dir, exist_ok=True)
    self.backend.save(os.path.join(out_dir, "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": self.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
      if getattr(self, name) is not None:
        cfg[name] = getattr(self, name)
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike, *, extra_eos_ids: Iterable[int] = ()) -> "Tokenizer":
    """Reads tokenizer.json, tokenizer_config.json and (if present) chat_template.jinja."""
    path = os.fspath(path)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
      raise WeightFileNotFoundError(tok_file, "tokenizer file not found (only tokenizer.json "
                                    "checkpoints are supported)")
    try:
      backend = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:  # tokenizers raises plain Exception subclasses
      raise WeightLoadError(tok_file, f"cannot parse tokenizer: {e}") from None
    cfg: dict[str, Any] = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
      try:
        with open(cfg_file, encoding="utf-8") as f:
          cfg = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadError(cfg_file, f"cannot parse JSON: {e}") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(path, "chat_template.jinja")  # transformers >= 4.50 writes this
    if template is None and os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    return cls(backend, chat_template=template, bos_token=_token_content(cfg.get("bos_token")),
               eos_token=_token_content(cfg.get("eos_token")),
               pad_token=_token_content(cfg.get("pad_token")),
               unk_token=_token_content(cfg.get("unk_token")),
               extra_eos_ids=extra_eos_ids, add_bos_token=bool(cfg.get("add_bos_token", False)),
               source=path)

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, eos_token: str | None = None) -> "Tokenizer":
    """An HF tokenizer.json (a file, or a folder holding one and maybe tokenizer_config.json).

    EOS: `eos_token`, else the config's, else the first known EOS-like token in the vocab
    (a bare tokenizer.json has no config); ValueError when none is found.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or os.path.basename(path) == "tokenizer.json":
      folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
      tok = cls.from_hf_dir(folder)
    elif os.path.isfile(path):
      try:
        tok = cls(tokenizers.Tokenizer.from_file(path), source=path)
      except Exception as e:  # tokenizers raises plain Exception subclasses
        raise WeightLoadError(path, f"cannot parse tokenizer: {e}") from None
    else:
      raise WeightFileNotFoundError(path, "no such tokenizer.json")
    candidates = (eos_token,) if eos_token is not None else (
        (tok.eos_token,) if tok.eos_id is not None else _EOS_CANDIDATES)
    found = [t for t in candidates if t is not None and tok.backend.token_to_id(t) is not None]
    if not found:
      raise WeightLoadError(path, f"no EOS token found (tried {list(candidates)}); pass eos_token")
    if found[0] != tok.eos_token:
      tok = cls(tok.backend, chat_template=tok.chat_template, bos_token=tok.bos_token,
                eos_token=found[0], pad_token=tok.pad_token, unk_token=tok.unk_token,
                add_bos_token=tok.add_bos_token, source=tok.source)
    return tok

  def __repr__(self):
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids})")


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus EOS (256) and PAD (257); no BOS, no chat template."""
  vocab_size = BYTE_VOCAB_SIZE
  eos_id = BYTE_EOS_ID
  eos_ids = (BYTE_EOS_ID,)
  pad_id = BYTE_PAD_ID
  bos_id = None
  chat_template = None
  cache_id = "byte-v1"

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    del add_special_tokens   # there is no BOS to add
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [self.encode(t, add_special_tokens) for t in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # EOS and PAD have no text either way
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model (see `train_sentencepiece`)."""
  chat_template = None

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(model_path):
      raise ValueError(f"sentencepiece model: no such file {model_path!r}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    self.eos_ids = (self.eos_id,)
    self.bos_id = int(self._sp.bos_id())
    self.pad_id = int(self._sp.pad_id())
    with open(model_path, "rb") as f:
      self.cache_id = "sp-" + hashlib.sha256(f.read()).hexdigest()[:16]

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(self._sp.encode(text, add_bos=add_special_tokens))

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return self._sp.encode(list(texts), add_bos=add_special_tokens)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # SentencePiece never writes control tokens as text
    return self._sp.decode([int(i) for i in ids])


def default_cache_dir() -> str:
  """$LS_DATA_CACHE, else $XDG_CACHE_HOME/ls_softgrpo/data, else ~/.cache/ls_softgrpo/data."""
  if os.environ.get("LS_DATA_CACHE"):
    return os.environ["LS_DATA_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ls_softgrpo", "data")


def sentencepiece_cache_path(corpus: "TextCorpus", vocab_size: int, sample_chars: int,
                             cache_dir: str) -> str:
  key = json.dumps([corpus.fingerprint, vocab_size, sample_chars, _SP_OPTIONS_VERSION])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"spm-{vocab_size}-{digest}.model")


def train_sentencepiece(corpus: "TextCorpus", *, vocab_size: int = SP_DEFAULT_VOCAB,
                        cache_dir: str | None = None,
                        sample_chars: int = SP_DEFAULT_SAMPLE_CHARS,
                        num_threads: int = 2) -> str:
  """Trains (or loads from cache) a SentencePiece model on a sample of `corpus`; its path.

  The sample is `corpus.sample_text(sample_chars)` (documents in id-hash order), so training
  takes seconds whatever the corpus size. Identity normalization, no dummy prefix and byte
  fallback make the round trip exact for code (indentation, newlines, any Unicode). The
  model file is written atomically.
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


def make_tokenizer(name: str = "byte", *, corpus: "TextCorpus | None" = None,
                   vocab_size: int = SP_DEFAULT_VOCAB, cache_dir: str | None = None,
                   sample_chars: int = SP_DEFAULT_SAMPLE_CHARS):
  """"byte" | "sentencepiece" (trained on `corpus`, cached) | path to an HF tokenizer.json."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    if corpus is None:
      raise ValueError("tokenizer 'sentencepiece': needs a text corpus to train on")
    return SentencePieceTokenizer(train_sentencepiece(
        corpus, vocab_size=vocab_size, cache_dir=cache_dir, sample_chars=sample_chars))
  if isinstance(name, str) and (name.endswith(".json") or os.path.isdir(name)):
    return Tokenizer.from_file(name)
  raise ValueError(f"tokenizer: unknown tokenizer {name!r}; choose one of "
                   f"{list(TOKENIZER_KINDS)} or a path to an HF tokenizer.json")
