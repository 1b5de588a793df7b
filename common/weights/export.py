"""Export a Decoder as an HF checkpoint directory that `transformers` (and we) can load.

Writes config.json, model.safetensors (numpy API, metadata format=pt), generation_config.json,
tokenizer.json and tokenizer_config.json. Only models expressible as LlamaForCausalLM /
Qwen2ForCausalLM export; anything else (learned positions, LS-attention, QK-norm, logit
soft-cap) is refused with an error naming the feature.
"""

from __future__ import annotations

import json
import os

import numpy as np

from common.config import ModelConfig
from common.model import Decoder
from common.tokenizer import Tokenizer
from common.weights.params import decoder_params

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _check_exportable(config: ModelConfig) -> str:
  """The HF architecture to export as; ValueError naming the first non-HF feature."""
  if config.position_embedding != "rope":
    raise ValueError(f"export_hf: position_embedding={config.position_embedding!r} has no HF "
                     "Llama/Qwen2 equivalent (only 'rope' exports)")
  if config.attention != "mhsa":
    raise ValueError(f"export_hf: attention={config.attention!r} has no HF Llama/Qwen2 "
                     "equivalent (only 'mhsa' exports)")
  if config.qk_norm:
    raise ValueError("export_hf: qk_norm=True has no HF Llama/Qwen2 equivalent")
  if config.attn_logits_soft_cap is not None:
    raise ValueError("export_hf: attn_logits_soft_cap has no HF Llama/Qwen2 equivalent")
  # HF Llama's attention_bias also adds an o_proj bias, so q/k/v biases export as Qwen2.
  if config.qkv_bias:
    return "Qwen2ForCausalLM"
  return config.architecture if config.architecture in _MODEL_TYPES else "LlamaForCausalLM"


def hf_config_dict(config: ModelConfig, arch: str, torch_dtype: str) -> dict:
  d = {
      "architectures": [arch],
      "model_type": _MODEL_TYPES[arch],
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "torch_dtype": torch_dtype,
      "use_cache": True,
      "initializer_range": 0.02,
  }
  if arch == "LlamaForCausalLM":
    d.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0)
  else:
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers,
             attention_dropout=0.0)
  return d


def hf_state_dict(model: Decoder, arch: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """Our params under HF names, linears transposed back to [out, in]."""
  config = model.config
  out: dict[str, np.ndarray] = {}
  for name, arr in decoder_params(model).items():
    if name == "embed_tokens.embedding":
      hf_name, arr = "model.embed_tokens.weight", arr
    elif name == "lm_head.kernel":
      hf_name, arr = "lm_head.weight", arr.T
    elif name.endswith(".kernel"):
      hf_name, arr = "model." + name[: -len(".kernel")] + ".weight", arr.T
    else:
      hf_name = "model." + name
    out[hf_name] = np.ascontiguousarray(arr.astype(dtype))
  if arch == "Qwen2ForCausalLM" and not config.qkv_bias:  # Qwen2 always has q/k/v biases
    for i in range(config.num_layers):
      for proj, width in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads),
                          ("v_proj", config.num_kv_heads)):
        out[f"model.layers.{i}.self_attn.{proj}.bias"] = np.zeros(width * config.head_dim, dtype)
  return out


def export_hf(model: Decoder, tokenizer: Tokenizer | None, config: ModelConfig | None,
              out_dir: str | os.PathLike, *, dtype: str | None = None) -> str:
  """Writes an HF checkpoint dir; returns its path. `dtype` defaults to config.param_dtype."""
  from safetensors.numpy import save_file
  import ml_dtypes

  config = config or model.config
  arch = _check_exportable(config)
  dtype = dtype or config.param_dtype
  np_dtype = {"float32": np.float32, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"export_hf: dtype must be float32, float16 or bfloat16, got {dtype!r}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  save_file(hf_state_dict(model, arch, np_dtype), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config_dict(config, arch, dtype), f, indent=2)
  gen = {"bos_token_id": config.bos_token_id, "_from_model_config": False}
  eos = list(tokenizer.eos_ids) if tokenizer is not None and tokenizer.eos_ids else (
      [config.eos_token_id] if config.eos_token_id is not None else [])
  if eos:
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return out_dir
