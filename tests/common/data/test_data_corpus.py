"""Corpora: stdlib default, folders/files, ArrayRecord, HF-on-disk, splits, and errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.data import corpus as corpus_lib
from common.data import load_token_corpus, open_corpus, split_of, stdlib_corpus
from common.tokenizer import ByteTokenizer


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


@pytest.fixture()
def text_folder(tmp_path):
  root = tmp_path / "corpus"
  rng = np.random.default_rng(0)
  for i in range(60):
    words = " ".join(f"w{int(x)}" for x in rng.integers(0, 50, 40))
    _write(str(root / f"sub{i % 3}" / f"doc{i:02d}.txt"), f"document {i}\n{words}\n")
  _write(str(root / "latin1.txt"), "caf\xe9".encode("latin-1"))   # not UTF-8: skipped
  _write(str(root / ".hidden.txt"), "never read")
  return str(root)


def test_stdlib_corpus_is_sorted_py_without_site_packages():
  c = stdlib_corpus()
  assert len(c.doc_ids) > 300
  assert list(c.doc_ids) == sorted(c.doc_ids)
  assert all(i.endswith(".py") for i in c.doc_ids)
  assert not any("site-packages" in i or "dist-packages" in i for i in c.doc_ids)
  assert "os.py" in c.doc_ids and "json/__init__.py" in c.doc_ids


def test_stdlib_train_val_disjoint_and_token_streams():
  c = stdlib_corpus()
  train, val = c.split_ids("train", 0.05), c.split_ids("val", 0.05)
  assert not set(train) & set(val)
  assert set(train) | set(val) == set(c.doc_ids)
  assert 0.02 < len(val) / len(c.doc_ids) < 0.1
  # the split is a function of the path alone (sha256, not Python's salted hash())
  assert all(split_of(i, 0.05) == "val" for i in val)
  tc = load_token_corpus("stdlib")
  assert tc.vocab_size == 258 and tc.eos_id == 256
  assert tc.train.size > 10 * tc.val.size > 0
  # val text is exactly its documents, in order, each followed by EOS
  _, first_val = next(c.documents("val", 0.05))        # first readable val document
  n = len(first_val.encode())
  assert ByteTokenizer().decode(tc.val[:n]) == first_val and tc.val[n] == 256


def test_folder_corpus_skips_non_utf8_and_hidden(text_folder):
  c = open_corpus(text_folder)
  assert ".hidden.txt" not in c.doc_ids and "latin1.txt" in c.doc_ids
  assert c.read("latin1.txt") is None
  tc = load_token_corpus(text_folder, val_fraction=0.2)
  docs = [t for _, t in c.documents("train", 0.2)] + [t for _, t in c.documents("val", 0.2)]
  assert tc.train.size + tc.val.size == sum(len(t.encode()) + 1 for t in docs)
  assert tc.val.size > 0


def test_token_cache_roundtrip(text_folder, tmp_path):
  a = load_token_corpus(text_folder, cache_dir=str(tmp_path / "cache"))
  b = load_token_corpus(text_folder, cache_dir=str(tmp_path / "cache"))
  assert isinstance(b.train, np.memmap)
  np.testing.assert_array_equal(a.train, b.train)
  assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("tokens-")]) == 2


def test_single_file_is_cut_into_blocks(tmp_path):
  para = "\n".join(f"line {i} " + "x" * 60 for i in range(20)) + "\n\n"
  path = str(tmp_path / "book.txt")
  _write(path, para * 200)
  c = open_corpus(path)
  assert len(c.doc_ids) > 10
  assert "".join(c.read(i) for i in c.doc_ids) == para * 200
  tc = load_token_corpus(path, val_fraction=0.1)
  assert tc.val.size > 0 and tc.train.size > tc.val.size


def test_array_record_corpus(tmp_path):
  array_record_module = pytest.importorskip("array_record.python.array_record_module")
  path = str(tmp_path / "docs.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  texts = [f"record {i}: " + "abc " * (i + 1) for i in range(30)]
  for t in texts:
    writer.write(t.encode())
  writer.write(b"\xff\xfe not utf-8")
  writer.close()
  c = open_corpus(path)
  assert len(c.doc_ids) == 31
  tc = load_token_corpus(path, val_fraction=0.2)
  assert tc.train.size + tc.val.size == sum(len(t) + 1 for t in texts)


def test_hf_dataset_on_disk(tmp_path):
  path = str(tmp_path / "hf")
  try:
    import datasets
  except ImportError:
    _write(os.path.join(path, "dataset_info.json"), "{}")
    with pytest.raises(ValueError, match="`datasets` package is not installed"):
      open_corpus(path)
    return
  dd = datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"text": [f"train doc {i}" for i in range(20)]}),
      "validation": datasets.Dataset.from_dict({"text": [f"val doc {i}" for i in range(5)]})})
  dd.save_to_disk(path)
  tc = load_token_corpus(path)
  assert ByteTokenizer().decode(tc.val).count("val doc") == 5


@pytest.mark.parametrize("source, match", [
    ("no_such_source", "unknown source name and no such corpus path"),
    ("/definitely/missing/corpus", "no such corpus path"),
])
def test_unknown_or_missing_source(source, match):
  with pytest.raises(ValueError, match=match) as e:
    load_token_corpus(source)
  assert "\n" not in str(e.value) and source in str(e.value)


def test_empty_corpora(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="corpus is empty"):
    load_token_corpus(str(empty))
  junk = tmp_path / "junk"
  _write(str(junk / "a.bin"), b"\xff\xfe\xfd")
  with pytest.raises(ValueError, match="corpus is empty") as e:
    load_token_corpus(str(junk))
  assert str(junk) in str(e.value)


def test_val_gets_a_document_when_the_fraction_catches_none(tmp_path):
  for i in range(3):
    _write(str(tmp_path / f"{i}.txt"), f"doc {i}")
  c = open_corpus(str(tmp_path))
  assert len(c.split_ids("val", 1e-9)) == 1 and len(c.split_ids("train", 1e-9)) == 2
  with pytest.raises(ValueError, match="^split"):
    c.split_ids("test", 0.1)
  assert corpus_lib.SPLITS == ("train", "val")
