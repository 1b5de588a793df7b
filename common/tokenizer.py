"""Tokenizer: a `tokenizers.Tokenizer` plus the special ids and the chat template.

Built from an HF checkpoint (`tokenizer.json` + `tokenizer_config.json`) by `from_hf_dir`, or
from GGUF metadata by `common.weights.gguf`. Chat templates are rendered the way transformers
renders them (`utils/chat_template_utils.py`): an `ImmutableSandboxedEnvironment` with
trim_blocks/lstrip_blocks, loopcontrols, a non-HTML-escaping `tojson`, `raise_exception` and
`strftime_now`, with the special tokens (`bos_token`, `eos_token`, ...) in scope.

Encoding a rendered chat: use `encode_chat` (or `encode(text, add_special_tokens=False)`),
because the template already writes BOS where the model wants one. `encode` also never
doubles a BOS that the text already starts with.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Iterable, Sequence

import tokenizers

from common import chat_template
from common.weights.errors import WeightFileNotFoundError, WeightLoadError


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
    return chat_template.render(  # sandboxed worker: time, output and memory limits
        self.chat_template, source=self.source, messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})

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

  def __repr__(self):
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids})")
