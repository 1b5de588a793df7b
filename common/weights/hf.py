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

from common.config import SIZE_LIMITS, ModelConfig
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError, checked_size
from common.weights.params import build_decoder, check_tensors

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
  size = {key: _hf_size(hf, key, ours, source) for key, ours in _HF_SIZES.items()}
  d_model, num_heads = size["hidden_size"], size["num_attention_heads"]
  num_kv_heads = size["num_key_value_heads"] or num_heads
  if num_heads % num_kv_heads:
    raise WeightLoadError(source, f"num_attention_heads={num_heads} is not a multiple of "
                          f"num_key_value_heads={num_kv_heads}")
  if size["head_dim"] is None and d_model % num_heads:
    raise WeightLoadError(source, f"hidden_size={d_model} is not divisible by "
                          f"num_attention_heads={num_heads} (and no head_dim is given)")
  try:
    theta, scaling = _rope_settings(hf)
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    return ModelConfig(
        vocab_size=size["vocab_size"],
        d_model=d_model,
        num_layers=size["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=size["head_dim"] or d_model // num_heads,
        mlp_dim=size["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=size["max_position_embeddings"] or 2048,
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


# HF config.json size fields -> ModelConfig fields (whose SIZE_LIMITS apply). The optional
# ones fall back to the usual defaults when absent or null.
_HF_SIZES = {"vocab_size": "vocab_size", "hidden_size": "d_model",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
             "intermediate_size": "mlp_dim", "max_position_embeddings": "max_position_embeddings"}
_HF_OPTIONAL = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _hf_size(hf: dict[str, Any], key: str, ours: str, source: str) -> int | None:
  if hf.get(key) is None:
    if key in _HF_OPTIONAL:
      return None
    raise WeightLoadError(source, f"missing config field {key!r}")
  return checked_size(source, key, hf[key], SIZE_LIMITS[ours])


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


def _safetensors_error(f: str, e: Exception) -> WeightLoadError:
  msg = str(e)
  if "incomplete" in msg or "too small" in msg or "not fully covered" in msg:
    msg = f"truncated or corrupt safetensors file ({msg})"
  return WeightLoadError(f, msg)


def read_safetensors_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
  """{HF name: shape} from the file headers only (no tensor data is read)."""
  from safetensors import safe_open

  out: dict[str, tuple[int, ...]] = {}
  for f in files:
    try:
      with safe_open(f, framework="numpy") as st:
        for name in st.keys():
          out[name] = tuple(int(d) for d in st.get_slice(name).get_shape())
    except Exception as e:  # SafetensorError derives from Exception only
      raise _safetensors_error(f, e) from None
  return out


def _our_names(hf_names, config: ModelConfig) -> dict[str, tuple[str, bool]]:
  """{HF name: (our name, transpose?)} for the tensors the Decoder uses."""
  out = {}
  for name in hf_names:
    mapped = hf_to_ours_name(name)
    if mapped is None:
      continue
    if mapped[0] == "lm_head.kernel" and config.tie_word_embeddings:
      continue  # some tied checkpoints still store a copy
    out[name] = mapped
  return out


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
      raise _safetensors_error(f, e) from None
  return out


def load_hf_checkpoint(path: str, dtype: str = "float32"):
  """(Decoder, Tokenizer, ModelConfig) from an HF checkpoint directory."""
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  hf = _read_json(config_file)
  if not isinstance(hf, dict):
    raise WeightLoadError(config_file, f"expected a JSON object, got {type(hf).__name__}")
  config = config_from_hf(hf, source=config_file, dtype=dtype)
  files = safetensors_files(path)
  source = files[0] if len(files) == 1 else path
  # Names and shapes are checked against the config from the headers, before any tensor is
  # read or the model is built (a config claiming 400 layers over 2-layer weights fails here).
  shapes = read_safetensors_shapes(files)
  names = _our_names(shapes, config)
  check_tensors(config, {ours: shapes[n][::-1] if t else shapes[n]
                         for n, (ours, t) in names.items()}, source=source)
  raw = read_safetensors(files)
  params = {ours: raw[n].T if t else raw[n] for n, (ours, t) in names.items()}
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
