"""Model configuration for the shared decoder-only transformer.

One frozen dataclass covers the Llama and Qwen2 families (RMSNorm, RoPE, GQA, SwiGLU,
optional qkv bias, tied/untied embeddings) plus the options the LS-attention paper needs
(learned absolute positions, a pluggable attention sub-layer, QK-norm, logit soft-cap).
Validation happens here, once, at the boundary.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

POSITION_EMBEDDINGS = ("rope", "learned", "none")
DTYPES = ("float32", "bfloat16", "float16")
# Upper bounds on sizes, so a hostile or mistyped config file fails in one line instead of
# building a model for minutes. Far above every released Llama/Qwen2 (405B: 126 layers,
# d_model 16384, mlp 53248; vocabularies <= 262k; contexts <= 10M).
SIZE_LIMITS = {"vocab_size": 1 << 22, "d_model": 1 << 16, "num_layers": 1024, "num_heads": 1024,
               "num_kv_heads": 1024, "head_dim": 4096, "mlp_dim": 1 << 20,
               "max_position_embeddings": 1 << 24}


def field_error(path: str, what: str, allowed) -> ValueError:
  """The house's one config error style: `<section>.<field>: what is wrong; allowed: ...`."""
  if isinstance(allowed, (tuple, list)):
    allowed = ", ".join(repr(a) for a in allowed)
  return ValueError(f"{path}: {what}; allowed: {allowed}")


# Rematerialisation of each decoder block in training (common/model.py): "none" keeps every
# activation, "dots" keeps only the matmul outputs without batch dims, "full" keeps only the
# block's input and recomputes the rest in the backward pass.
REMAT = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # HF-style rope scaling dict; only {"rope_type": "llama3", ...} (Llama-3.x) is supported.
  rope_scaling: dict[str, Any] | None = None
  position_embedding: str = "rope"
  max_position_embeddings: int = 2048
  qkv_bias: bool = False
  tie_word_embeddings: bool = True
  # Attention sub-layer, looked up in common.attention's registry ("mhsa"; "ls" once
  # `import ls_attention` has registered it).
  attention: str = "mhsa"
  num_local_heads: int = 0
  window: int = 0
  # Stabilizers that live inside attention (the LS-attention paper's competitors).
  qk_norm: bool = False
  attn_logits_soft_cap: float | None = None
  # Which LS-attention implementation to use ("auto", "xla", "reference", "pallas", ...).
  attention_impl: str = "auto"
  # LS-attention kernel tiles: None, or a dict of ls_attention.BlockSizes fields (checked there).
  attn_block_sizes: dict[str, int] | None = None
  # Compute dtype of activations; parameters are kept in param_dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Token ids the sampler and chat helpers use; None when unknown.
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  # "LlamaForCausalLM" / "Qwen2ForCausalLM": the HF class this config exports as.
  architecture: str = "LlamaForCausalLM"
  # Training memory only (see REMAT); does not change parameters or outputs.
  remat: str = "none"

  def __post_init__(self):
    for name, limit in SIZE_LIMITS.items():
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise field_error(f"model.{name}", f"got {value!r}", f"a positive int <= {limit}")
    if self.num_heads % self.num_kv_heads:
      raise field_error("model.num_kv_heads", f"{self.num_kv_heads} does not divide "
                        f"num_heads={self.num_heads}", "a divisor of num_heads")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise field_error("model.position_embedding", f"got {self.position_embedding!r}",
                        POSITION_EMBEDDINGS)
    from common.layers import dtype_name   # jnp.bfloat16 etc. -> "bfloat16"
    for name in ("dtype", "param_dtype"):
      object.__setattr__(self, name, dtype_name(getattr(self, name)))
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise field_error(f"model.{name}", f"got {getattr(self, name)!r}", DTYPES)
    if self.remat not in REMAT:
      raise field_error("model.remat", f"got {self.remat!r}", REMAT)
    if self.attention == "ls":
      # All heads local is allowed (LS-attention's all-local ablation); the model rule
      # lives here only.
      if not 0 <= self.num_local_heads <= self.num_heads:
        raise field_error("model.num_local_heads", f"{self.num_local_heads} is outside "
                          f"0..num_heads={self.num_heads}", "0..num_heads")
      if self.num_local_heads and self.window < 1:
        raise field_error("model.window", f"got {self.window} with local heads",
                          ">= 1 for attention='ls'")
    if self.attn_logits_soft_cap is not None and self.attn_logits_soft_cap <= 0:
      raise field_error("model.attn_logits_soft_cap", f"got {self.attn_logits_soft_cap}",
                        "> 0 or None")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if kind not in ("llama3", "default"):
        raise field_error("model.rope_scaling", f"type {kind!r} is not supported",
                          ("llama3", "default"))

  def __hash__(self):
    # Explicit because rope_scaling is a dict; jit needs the config hashable (it is part of
    # the model's static graph definition).
    return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**d)

  @property
  def num_params_estimate(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    emb = self.vocab_size * self.d_model * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * (attn + mlp + 2 * self.d_model) + emb + self.d_model


def tiny_config(**overrides) -> ModelConfig:
  """A small random-init config for tests and smoke runs."""
  base = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, max_position_embeddings=256)
  base.update(overrides)
  return ModelConfig(**base)
