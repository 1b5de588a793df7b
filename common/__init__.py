"""Ground floor: the shared decoder, weights, tokenizer, sampler (see WORKSPACE.md)."""


def load_pretrained(name_or_path, dtype="float32"):
  """(model, tokenizer, config) from "smollm2-135m", an HF checkpoint dir or a .gguf file.

  Lazy wrapper so `import common` stays cheap; see common/pretrained.py.
  """
  from common.pretrained import load_pretrained as _load
  return _load(name_or_path, dtype)


__all__ = ["load_pretrained"]
