"""A bounded pre-scan of a GGUF header, run before `gguf.GGUFReader` touches the file.

GGUFReader walks every metadata array element by element in Python and trusts the counts it
reads, so a file that declares an array of 2^40 elements (or a 2^60-byte string, or 2^40
tensors) makes it loop and grow memory without bound. This scan reads only the header
(layout: ggml/docs/gguf.md), checks every count and length against the file size and the
caps below, and raises a one-line `WeightLoadError` naming the file and the key before any
large allocation. It touches each string once (about 0.1 s for a 150k-token vocabulary).
"""

from __future__ import annotations

import mmap
import os
import struct

from common.weights.errors import WeightLoadError

# Far above real files (vocabularies and merge lists <= a few hundred thousand entries,
# chat templates <= tens of KB, < 10k tensors even for large MoE models).
MAX_ARRAY_LEN = 1 << 23
MAX_STRING_BYTES = 1 << 20
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Cursor:

  def __init__(self, buf, path: str, order: str):
    self.buf, self.path, self.order, self.pos = buf, path, order, 0

  def fail(self, problem: str):
    raise WeightLoadError(self.path, f"invalid GGUF header: {problem}")

  def need(self, n: int, what: str) -> None:
    if n > len(self.buf) - self.pos:
      self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file has "
                f"{len(self.buf) - self.pos} left (truncated or corrupt)")

  def unpack(self, fmt: str, what: str):
    size = struct.calcsize(fmt)
    self.need(size, what)
    (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
    self.pos += size
    return value

  def string(self, what: str) -> bytes:
    n = self.unpack("Q", f"the length of {what}")
    if n > MAX_STRING_BYTES:
      self.fail(f"{what} is a string of {n} bytes; allowed: <= {MAX_STRING_BYTES}")
    self.need(n, what)
    out = bytes(self.buf[self.pos:self.pos + n])
    self.pos += n
    return out

  def skip_value(self, vtype: int, key: str, in_array: bool = False) -> None:
    if vtype in _SCALAR_BYTES:
      self.need(_SCALAR_BYTES[vtype], key)
      self.pos += _SCALAR_BYTES[vtype]
    elif vtype == _STRING:
      self.string(key)
    elif vtype == _ARRAY and not in_array:
      itype = self.unpack("I", f"the element type of {key}")
      n = self.unpack("Q", f"the length of {key}")
      if n > MAX_ARRAY_LEN:
        self.fail(f"metadata {key} is an array of {n} elements; allowed: <= {MAX_ARRAY_LEN}")
      if itype in _SCALAR_BYTES:
        self.need(n * _SCALAR_BYTES[itype], key)
        self.pos += n * _SCALAR_BYTES[itype]
      elif itype == _STRING:
        self.need(8 * n, key)  # every string has an 8-byte length
        pos, end, fmt = self.pos, len(self.buf), self.order + "Q"
        for _ in range(n):  # lengths only: no copies (this loop sees every vocabulary entry)
          (size,) = struct.unpack_from(fmt, self.buf, pos) if end - pos >= 8 else (end,)
          if size > MAX_STRING_BYTES or size > end - pos - 8:
            self.pos = pos
            self.string(key)  # raises the precise message
          pos += 8 + size
        self.pos = pos
      else:
        self.fail(f"metadata {key} has unsupported element type {itype}")
    else:
      self.fail(f"metadata {key} has unsupported value type {vtype}")


def check_gguf_header(path: str) -> None:
  """Raises a one-line WeightLoadError if the header of the GGUF file `path` is out of bounds."""
  try:
    with open(path, "rb") as f:
      if os.fstat(f.fileno()).st_size < 24:
        raise WeightLoadError(path, "not a GGUF file (shorter than a GGUF header)")
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        with memoryview(buf) as view:
          _scan(view, path)
  except OSError as e:
    raise WeightLoadError(path, f"cannot read: {e.strerror or e}") from None


def _scan(buf, path: str) -> None:
  if bytes(buf[:4]) != _MAGIC:
    raise WeightLoadError(path, f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
  (version,) = struct.unpack_from("<I", buf, 4)
  order = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file, as GGUFReader detects
  cur = _Cursor(buf, path, order)
  cur.pos = 8
  n_tensors = cur.unpack("Q", "the tensor count")
  n_kv = cur.unpack("Q", "the metadata count")
  if n_tensors > MAX_TENSORS:
    cur.fail(f"tensor count {n_tensors}; allowed: <= {MAX_TENSORS}")
  if n_kv > MAX_KV:
    cur.fail(f"metadata count {n_kv}; allowed: <= {MAX_KV}")
  for i in range(n_kv):
    key = cur.string(f"metadata key #{i}").decode("utf-8", "replace")
    cur.skip_value(cur.unpack("I", f"the type of {key}"), key)
  for i in range(n_tensors):
    name = cur.string(f"tensor name #{i}").decode("utf-8", "replace")
    n_dims = cur.unpack("I", f"the rank of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
      cur.fail(f"tensor {name} has {n_dims} dimensions; allowed: 1..{MAX_DIMS}")
    cur.need(8 * n_dims + 12, f"tensor {name}")
    cur.pos += 8 * n_dims + 12  # dims (u64 each), type (u32), data offset (u64)
