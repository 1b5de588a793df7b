"""Text corpora as lists of documents with stable ids, read lazily, split by id hash.

A corpus is named by `source`:
  "stdlib"            the `*.py` files of the running interpreter's standard library
                      (`sysconfig.get_paths()["stdlib"]`, `site-packages`/`dist-packages` left out);
  a text file         cut at blank lines into blocks of about `_BLOCK_CHARS` characters;
  a folder            every non-hidden regular file below it (recursively);
  an HF dataset       a folder written by `datasets.Dataset(Dict).save_to_disk` with a `text`
                      column (needs the `datasets` package, imported only here);
  ArrayRecord         a `*.array_record` file, or a folder holding such files; each record is
                      one UTF-8 document (needs the `array_record` package).
("synthetic" is not a text corpus; see `common.data.synthetic`.)

The train/val split is a pure function of the document id: sha256(id) mapped to [0, 1) and
compared with `val_fraction` (never Python's salted `hash()`), so it is the same on every
machine and does not move when documents are added elsewhere in the corpus. Documents that are
unreadable or not UTF-8 are skipped (`read` returns None).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from typing import Callable, Sequence

SPLITS = ("train", "val")
_BLOCK_CHARS = 16_384          # single-file corpora: documents of about this size
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Documents addressed by stable string ids (sorted), read on demand.

  name:        the source string as given (for messages and cache keys).
  doc_ids:     every document id, sorted.
  read:        id -> text, or None when the document is unreadable / not UTF-8.
  fingerprint: a cheap hash of what the corpus holds (paths, sizes, mtimes or the dataset's own
               fingerprint); caches of tokenizers and token arrays are keyed on it.
  fixed_splits: id -> "train"/"val" where the corpus brings its own split (HF DatasetDict).
  """
  name: str
  doc_ids: tuple[str, ...]
  read: Callable[[str], str | None]
  fingerprint: str
  fixed_splits: dict[str, str] | None = None

  def split_ids(self, split: str, val_fraction: float) -> list[str]:
    """The ids of one split, in sorted order."""
    _check_split(split, val_fraction)
    if self.fixed_splits is not None:
      return [i for i in self.doc_ids if self.fixed_splits[i] == split]
    val = [i for i in self.doc_ids if _unit_hash(i) < val_fraction]
    if not val and val_fraction > 0 and len(self.doc_ids) >= 2:
      # Too few documents for the fraction to catch one: the lowest-hash document is val.
      val = [min(self.doc_ids, key=_unit_hash)]
    if split == "val":
      return val
    val_set = set(val)
    return [i for i in self.doc_ids if i not in val_set]

  def documents(self, split: str, val_fraction: float):
    """Yields (id, text) for the readable documents of one split, in sorted id order."""
    for doc_id in self.split_ids(split, val_fraction):
      text = self.read(doc_id)
      if text:
        yield doc_id, text

  def sample_text(self, max_chars: int) -> list[str]:
    """Whole documents, in sha256(id) order, until `max_chars` characters (the last one cut).

    A deterministic, order-free sample (e.g. for training a tokenizer) that does not depend on
    how the corpus is sorted on disk.
    """
    out, total = [], 0
    for doc_id in sorted(self.doc_ids, key=_unit_hash):
      if total >= max_chars:
        break
      text = self.read(doc_id)
      if not text:
        continue
      text = text[: max_chars - total]
      out.append(text)
      total += len(text)
    return out


def split_of(doc_id: str, val_fraction: float) -> str:
  """"val" if sha256(doc_id) (as a number in [0, 1)) < val_fraction, else "train"."""
  return "val" if _unit_hash(doc_id) < val_fraction else "train"


def _unit_hash(doc_id: str) -> float:
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_split(split: str, val_fraction: float) -> None:
  if split not in SPLITS:
    raise ValueError(f"split: unknown split {split!r}; choose one of {list(SPLITS)}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")


def _read_utf8(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      data = f.read()
    return data.decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return None


def _stat_fingerprint(root: str, rel_paths: Sequence[str], extra: str = "") -> str:
  h = hashlib.sha256(extra.encode())
  for rel in rel_paths:
    try:
      st = os.stat(os.path.join(root, rel))
      h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
      h.update(f"{rel}\0missing\n".encode())
  return h.hexdigest()[:16]


def _walk_files(root: str, suffix: str | None) -> list[str]:
  """Relative posix paths of the non-hidden regular files below root, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
    for name in filenames:
      if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
        continue
      full = os.path.join(dirpath, name)
      if os.path.isfile(full):
        out.append(os.path.relpath(full, root).replace(os.sep, "/"))
  return sorted(out)


def _folder_corpus(name: str, root: str, suffix: str | None) -> TextCorpus:
  rel = _walk_files(root, suffix)
  return TextCorpus(name=name, doc_ids=tuple(rel),
                    read=lambda i: _read_utf8(os.path.join(root, i)),
                    fingerprint=_stat_fingerprint(root, rel, extra=f"folder:{suffix}"))


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_corpus() -> TextCorpus:
  """The running interpreter's standard library, `*.py` files, as documents."""
  return _folder_corpus("stdlib", stdlib_root(), ".py")


def _blocks(text: str, block_chars: int) -> list[str]:
  """Cuts text at blank lines into consecutive blocks of >= block_chars (the last may be short)."""
  blocks, start, pos = [], 0, 0
  while True:
    pos = text.find("\n\n", start + block_chars)
    if pos < 0:
      break
    blocks.append(text[start:pos + 2])
    start = pos + 2
  if start < len(text):
    blocks.append(text[start:])
  return blocks


def _file_corpus(name: str, path: str) -> TextCorpus:
  text = _read_utf8(path)
  if text is None:
    raise ValueError(f"data source {name!r}: file is unreadable or not UTF-8 text")
  blocks = _blocks(text, _BLOCK_CHARS)
  base = os.path.basename(path)
  ids = tuple(f"{base}#{k:08d}" for k in range(len(blocks)))
  table = dict(zip(ids, blocks))
  root, rel = os.path.split(path)
  return TextCorpus(name=name, doc_ids=ids, read=table.get,
                    fingerprint=_stat_fingerprint(root, [rel], extra="file"))


def _hf_corpus(name: str, path: str) -> TextCorpus:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data source {name!r}: is a HF dataset folder but the `datasets` package "
                     "is not installed (pip install datasets)") from None
  loaded = datasets.load_from_disk(path)
  if isinstance(loaded, datasets.DatasetDict):
    parts = dict(loaded)
  else:
    parts = {"": loaded}
  fixed = None
  if "train" in parts:
    val_key = next((k for k in ("validation", "val", "valid", "test") if k in parts), None)
    if val_key is not None:
      # Keep the dataset's own split: "validation" (else "val"/"valid"/"test") is val.
      parts = {"train": parts["train"], val_key: parts[val_key]}
      fixed = {}
  for key, ds in parts.items():
    if "text" not in ds.column_names:
      raise ValueError(f"data source {name!r}: HF dataset split {key or 'default'!r} has no "
                       f"'text' column (columns: {ds.column_names})")
  ids, where = [], {}
  for key, ds in parts.items():
    for row in range(len(ds)):
      doc_id = f"{key}:{row:010d}"
      ids.append(doc_id)
      where[doc_id] = (ds, row)
      if fixed is not None:
        fixed[doc_id] = "train" if key == "train" else "val"
  prints = [getattr(ds, "_fingerprint", "") or "" for ds in parts.values()]

  def read(doc_id: str) -> str | None:
    ds, row = where[doc_id]
    text = ds[row]["text"]
    return text if isinstance(text, str) else None

  fp = hashlib.sha256(json.dumps([sorted(parts), prints, len(ids)]).encode()).hexdigest()[:16]
  return TextCorpus(name=name, doc_ids=tuple(sorted(ids)), read=read, fingerprint=fp,
                    fixed_splits=fixed)


def _array_record_corpus(name: str, files: list[str]) -> TextCorpus:
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data source {name!r}: holds ArrayRecord files but the `array_record` "
                     "package is not installed (pip install array-record)") from None
  ids, where = [], {}
  for fi, path in enumerate(files):
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    n = reader.num_records()
    reader.close()
    for r in range(n):
      doc_id = f"{os.path.basename(path)}:{r:010d}"
      ids.append(doc_id)
      where[doc_id] = (fi, r)
  readers: dict[int, object] = {}

  def read(doc_id: str) -> str | None:
    fi, r = where[doc_id]
    if fi not in readers:
      readers[fi] = array_record_module.ArrayRecordReader(files[fi], "readahead_buffer_size:0")
    data = readers[fi].read([r])[0]
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError:
      return None

  root = os.path.dirname(files[0])
  rel = [os.path.relpath(f, root) for f in files]
  return TextCorpus(name=name, doc_ids=tuple(sorted(ids)), read=read,
                    fingerprint=_stat_fingerprint(root, rel, extra="array_record"))


def _is_array_record(path: str) -> bool:
  return ".array_record" in os.path.basename(path)


def open_corpus(source: str) -> TextCorpus:
  """The text corpus named by `source` (see the module docstring). Raises one-line ValueErrors.

  Emptiness is checked where the corpus is tokenized (`common.data.tokens`), since finding it
  means reading every document.
  """
  if not isinstance(source, str) or not source:
    raise ValueError(f"data source: expected 'stdlib', 'synthetic' or a corpus path, got {source!r}")
  if source == "stdlib":
    return stdlib_corpus()
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise ValueError(f"data source {source!r}: unknown source name and no such corpus path; "
                     "use 'stdlib', 'synthetic', or a text file/folder, HF dataset folder or "
                     "ArrayRecord file")
  if os.path.isfile(path):
    if _is_array_record(path):
      return _array_record_corpus(source, [path])
    return _file_corpus(source, path)
  if any(os.path.exists(os.path.join(path, m)) for m in _HF_MARKERS):
    return _hf_corpus(source, path)
  records = [os.path.join(path, f) for f in sorted(os.listdir(path)) if _is_array_record(f)]
  if records:
    return _array_record_corpus(source, records)
  return _folder_corpus(source, path, None)
