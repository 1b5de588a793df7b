"""Ground floor: the shared decoder, weights, tokenizer, sampler (see WORKSPACE.md)."""


def load_pretrained(name_or_path, dtype="float32", *, step=None):
  """(model, tokenizer, config) from "smollm2-135m", an HF checkpoint dir, a .gguf file or a
  train_lm / soft_grpo run folder (newest checkpoint, or `step`).

  Lazy wrapper so `import common` stays cheap; see common/pretrained.py.
  """
  from common.pretrained import load_pretrained as _load
  return _load(name_or_path, dtype, step=step)


__all__ = ["load_pretrained"]
