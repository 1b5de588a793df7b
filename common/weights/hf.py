"""Hugging Face checkpoint directories -> (Decoder, Tokenizer, ModelConfig).

Supported `architectures`: LlamaForCausalLM (Llama-2/3.x, SmolLM2, ...) and Qwen2ForCausalLM
(Qwen2/2.5, DeepSeek-R1-Distill-Qwen). Weights are read with the safetensors numpy API, one
file (`model.safetensors`) or sharded (`model.safetensors.index.json`). HF linears store
`weight` as [out, in]; ours store `kernel` as [in, out], hence the transposes.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any

import numpy as np

from common.config import ModelConfig
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError
from common.weights.params import build_decoder

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise WeightFileNotFoundError(path, "file not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightLoadError(path, f"cannot parse JSON: {e}") from None


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling) from either the v4 keys or transformers v5 `rope_parameters`."""
  theta = hf.get("rope_theta")
  scaling = hf.get("rope_scaling")
  params = hf.get("rope_parameters")
  if isinstance(params, dict):
    theta = params.get("rope_theta", theta)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
      scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  if isinstance(scaling, dict):
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
      scaling = None
  return float(theta if theta is not None else 10000.0), scaling


def config_from_hf(hf: dict[str, Any], *, source: str, dtype: str = "float32") -> ModelConfig:
  """Maps an HF config.json dict onto ModelConfig; `source` names the file in errors."""
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if arch is None:
    raise WeightLoadError(source, f"unsupported architectures {archs!r} "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise WeightLoadError(source, f"unsupported hidden_act {act!r} (only 'silu', i.e. SwiGLU)")
  if hf.get("mlp_bias"):
    raise WeightLoadError(source, "unsupported mlp_bias=true (the shared decoder's MLP has no bias)")
  if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
    # Llama's attention_bias also puts a bias on o_proj, which the shared decoder lacks.
    raise WeightLoadError(source, "unsupported attention_bias=true for LlamaForCausalLM "
                          "(o_proj bias); only Qwen2-style q/k/v biases are supported")
  if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
    # Qwen2's sliding window only applies past `max_window_layers` and long contexts; the
    # released Qwen2/2.5/R1-Distill checkpoints ship with it off. We always attend fully.
    warnings.warn(f"{source}: use_sliding_window=true is ignored (full attention is used)")
  try:
    d_model = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    theta, scaling = _rope_settings(hf)
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or d_model // num_heads),
        mlp_dim=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        qkv_bias=arch == "Qwen2ForCausalLM",  # Qwen2 always has q/k/v biases
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        architecture=arch,
    )
  except KeyError as e:
    raise WeightLoadError(source, f"missing config field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise WeightLoadError(source, str(e)) from None


def hf_to_ours_name(name: str) -> tuple[str, bool] | None:
  """HF tensor name -> (our flat name, transpose?); None for tensors we drop on purpose."""
  if name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
    return None
  if name == "lm_head.weight":
    return "lm_head.kernel", True
  if name.startswith("model."):
    name = name[len("model."):]
  if name == "embed_tokens.weight":
    return "embed_tokens.embedding", False
  if name == "norm.weight":
    return "norm.weight", False
  for lin in _LINEARS:
    for suffix, ours, transpose in ((".weight", ".kernel", True), (".bias", ".bias", False)):
      if name.endswith(f"{lin}{suffix}"):
        return name[: -len(suffix)] + ours, transpose
  return name, False  # norms (input_layernorm.weight, ...) keep their names


def safetensors_files(path: str) -> list[str]:
  """The weight files of a checkpoint dir, from the shard index when there is one."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise WeightLoadError(index, "no 'weight_map' in the shard index")
    files = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
    for f in files:
      if not os.path.isfile(f):
        raise WeightFileNotFoundError(f, f"shard listed in {os.path.basename(index)} not found")
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise WeightFileNotFoundError(os.path.join(path, "model.safetensors"),
                                  "no *.safetensors weights in the checkpoint directory "
                                  "(.bin/pickle checkpoints are not supported)")
  return files


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  """{HF name: numpy array} from all files; one-line error naming a bad file."""
  from safetensors import safe_open

  out: dict[str, np.ndarray] = {}
  for f in files:
    try:
      with safe_open(f, framework="numpy") as st:
        for name in st.keys():
          out[name] = st.get_tensor(name)
    except Exception as e:  # SafetensorError derives from Exception only
      msg = str(e)
      if "incomplete" in msg or "too small" in msg or "not fully covered" in msg:
        msg = f"truncated or corrupt safetensors file ({msg})"
      raise WeightLoadError(f, msg) from None
  return out


def load_hf_checkpoint(path: str, dtype: str = "float32"):
  """(Decoder, Tokenizer, ModelConfig) from an HF checkpoint directory."""
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  hf = _read_json(config_file)
  config = config_from_hf(hf, source=config_file, dtype=dtype)
  files = safetensors_files(path)
  raw = read_safetensors(files)
  params: dict[str, np.ndarray] = {}
  for name, arr in raw.items():
    mapped = hf_to_ours_name(name)
    if mapped is None:
      continue
    ours, transpose = mapped
    if ours == "lm_head.kernel" and config.tie_word_embeddings:
      continue  # some tied checkpoints still store a copy
    params[ours] = arr.T if transpose else arr
  source = files[0] if len(files) == 1 else path
  model = build_decoder(config, params, source=source)
  extra_eos = []
  gen_file = os.path.join(path, "generation_config.json")
  for d in (hf, _read_json(gen_file) if os.path.isfile(gen_file) else {}):
    e = d.get("eos_token_id")
    extra_eos += e if isinstance(e, list) else ([e] if e is not None else [])
  tokenizer = Tokenizer.from_hf_dir(path, extra_eos_ids=extra_eos)
  if tokenizer.eos_id is None and extra_eos:
    tokenizer.eos_id = extra_eos[0]
  if tokenizer.bos_id is None and config.bos_token_id is not None:
    tokenizer.bos_id = config.bos_token_id
  return model, tokenizer, config
