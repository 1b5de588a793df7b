"""Export a Decoder: an HF checkpoint where HF has the architecture, else this package's own.

`export_hf` writes config.json, model.safetensors (numpy API, metadata format=pt),
generation_config.json, tokenizer.json and tokenizer_config.json. Only models expressible as
LlamaForCausalLM / Qwen2ForCausalLM export that way; anything else (learned positions,
LS-attention, QK-norm, logit soft-cap) is refused with an error naming the feature.

`export_native` writes what such a model is, for this package: model.safetensors under our
parameter names (`layers.0.self_attn.q_proj.kernel`, [in, out] layout), ls_softgrpo_model.json
(the ModelConfig and the tokenizer kind), the tokenizer, and a README.txt saying that HF
transformers cannot run it and how to load it (`load_pretrained(<dir>)`).

`export_model` picks one; `export_run` exports a train_lm / soft_grpo run folder.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from common.config import ModelConfig
from common.model import Decoder
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError
from common.weights.params import build_decoder, check_tensors, decoder_params

NATIVE_CONFIG = "ls_softgrpo_model.json"
NATIVE_FORMAT = "ls_softgrpo.decoder.v1"

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _non_hf_features(config: ModelConfig) -> list[str]:
  """Each feature of `config` that HF Llama/Qwen2 lack, as 'field=value has no ... equivalent'."""
  out = []
  if config.position_embedding != "rope":
    out.append(f"position_embedding={config.position_embedding!r} has no HF Llama/Qwen2 "
               "equivalent (only 'rope' exports)")
  if config.attention != "mhsa":
    out.append(f"attention={config.attention!r} has no HF Llama/Qwen2 equivalent (only "
               "'mhsa' exports)")
  if config.qk_norm:
    out.append("qk_norm=True has no HF Llama/Qwen2 equivalent")
  if config.attn_logits_soft_cap is not None:
    out.append("attn_logits_soft_cap has no HF Llama/Qwen2 equivalent")
  return out


def _check_exportable(config: ModelConfig) -> str:
  """The HF architecture to export as; ValueError naming the first non-HF feature."""
  features = _non_hf_features(config)
  if features:
    raise ValueError(f"export_hf: {features[0]}")
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


# ------------------------------------------------------------------ tokenizers as files ---


def byte_tokenizer_as_hf(tok) -> Tokenizer:
  """The ByteTokenizer as an HF `tokenizers` tokenizer with the same ids (byte b -> id b,
  EOS 256, PAD 257): byte-level BPE with no merges over GPT-2's byte alphabet, so
  transformers' AutoTokenizer and our loader both read it. Text that spells "<eos>" literally
  encodes as EOS here (a special token), as bytes in the ByteTokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  from common.weights.gguf import _bytes_to_unicode

  table = _bytes_to_unicode()
  vocab = {table[b]: b for b in range(256)}
  vocab.update({"<eos>": tok.eos_id, "<pad>": tok.pad_id})
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(["<eos>", "<pad>"])
  return Tokenizer(backend, eos_token="<eos>", pad_token="<pad>", source="bytes")


def _write_tokenizer(tokenizer, out_dir: str) -> str:
  """Writes the tokenizer where our loader (and, for HF kinds, transformers) finds it;
  returns its kind: "hf", "byte", "sentencepiece" or "none"."""
  from common import tokenizer as tok_lib

  if tokenizer is None:
    return "none"
  if isinstance(tokenizer, tok_lib.ByteTokenizer):
    byte_tokenizer_as_hf(tokenizer).save(out_dir)
    return "byte"
  if isinstance(tokenizer, tok_lib.SentencePieceTokenizer):
    shutil.copyfile(tokenizer.model_path, os.path.join(out_dir, "tokenizer.model"))
    return "sentencepiece"
  tokenizer.save(out_dir)
  return "hf"


# --------------------------------------------------------------- native (non-HF) export ---

_README = """\
What this folder is
===================
A decoder of the ls_softgrpo package: {arch}.
Exported{source}.

HF transformers CANNOT run it:
  {why}.
There is deliberately no HF config.json, so no HF loader mistakes it for Llama/Qwen2.

Files
  model.safetensors      every parameter under this package's names and layout
                         (e.g. layers.0.self_attn.q_proj.kernel, [in_features, out_features]),
                         dtype {dtype}; {num_params:,} parameters
  {config_name}  {{"format": "{fmt}", "tokenizer": "{tok_kind}",
                         "model_config": <the common.config.ModelConfig fields>}}
{tok_files}  README.txt             this file

Load it
  from common import load_pretrained
  import ls_attention            # registers attention="ls" (needed for LS-attention models)
  model, tokenizer, config = load_pretrained("{out_dir}")
or generate from the command line:
  python -m experiments.generate --model={out_dir} --raw --prompt="..."
"""

_TOK_FILES = {
    "byte": "  tokenizer.json         UTF-8 bytes: ids 0..255 are bytes, 256 = <eos>, 257 = <pad>\n"
            "  tokenizer_config.json  (written as an HF tokenizers file; exact for any text)\n",
    "sentencepiece": "  tokenizer.model        the run's SentencePiece model\n",
    "hf": "  tokenizer.json         the run's HF tokenizer (+ tokenizer_config.json)\n"
          "  tokenizer_config.json\n",
    "none": "  (no tokenizer: the model was trained on token ids only)\n",
}


def non_hf_reason(config: ModelConfig) -> str | None:
  """Why HF transformers cannot run `config` (None when it can, as Llama/Qwen2)."""
  return "; ".join(_non_hf_features(config)) or None


def _np_dtype(dtype: str, who: str):
  import ml_dtypes
  np_dtype = {"float32": np.float32, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"{who}: dtype must be float32, float16 or bfloat16, got {dtype!r}")
  return np_dtype


def export_native(model: Decoder, tokenizer, config: ModelConfig | None,
                  out_dir: str | os.PathLike, *, dtype: str | None = None,
                  source: str | None = None) -> str:
  """Writes the native export of `model` (see the module docstring); returns its path."""
  from safetensors.numpy import save_file

  config = config or model.config
  dtype = dtype or config.param_dtype
  np_dtype = _np_dtype(dtype, "export_native")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  params = {k: np.ascontiguousarray(v.astype(np_dtype))
            for k, v in decoder_params(model).items()}
  save_file(params, os.path.join(out_dir, "model.safetensors"),
            metadata={"format": NATIVE_FORMAT})
  tok_kind = _write_tokenizer(tokenizer, out_dir)
  stored = config.replace(param_dtype=dtype)
  with open(os.path.join(out_dir, NATIVE_CONFIG), "w") as f:
    json.dump({"format": NATIVE_FORMAT, "model_config": stored.to_dict(),
               "tokenizer": tok_kind}, f, indent=2)
  arch = ("LS-attention" if config.attention == "ls" else config.attention.upper())
  arch += f" ({config.num_layers} layers, d_model {config.d_model}, "
  arch += f"{config.position_embedding} positions)"
  with open(os.path.join(out_dir, "README.txt"), "w") as f:
    f.write(_README.format(
        arch=arch, source=f" from {source}" if source else "",
        why=(non_hf_reason(config) or "it was exported in this package's own format "
             "(format='native')").replace("; ", ";\n  "),
        dtype=dtype, num_params=sum(int(v.size) for v in params.values()),
        config_name=NATIVE_CONFIG, fmt=NATIVE_FORMAT, tok_kind=tok_kind,
        tok_files=_TOK_FILES[tok_kind], out_dir=out_dir))
  return out_dir


def is_native_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, NATIVE_CONFIG))


def load_native(path: str, dtype: str = "float32"):
  """(Decoder, tokenizer or None, ModelConfig) of an `export_native` folder."""
  from safetensors import safe_open

  from common import tokenizer as tok_lib

  cfg_file = os.path.join(path, NATIVE_CONFIG)
  try:
    with open(cfg_file, encoding="utf-8") as f:
      d = json.load(f)
    if d.get("format") != NATIVE_FORMAT:
      raise WeightLoadError(cfg_file, f"format {d.get('format')!r} is not {NATIVE_FORMAT!r}")
    config = ModelConfig.from_dict(d["model_config"]).replace(dtype=dtype, param_dtype=dtype)
  except WeightLoadError:
    raise
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise WeightLoadError(cfg_file, f"unreadable native export config ({type(e).__name__}: "
                          f"{e})") from None
  weights = os.path.join(path, "model.safetensors")
  if not os.path.isfile(weights):
    raise WeightFileNotFoundError(weights, "file not found")
  try:
    with safe_open(weights, framework="numpy") as st:
      shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
      check_tensors(config, shapes, source=weights)
      params = {k: st.get_tensor(k) for k in st.keys()}
  except WeightLoadError:
    raise
  except Exception as e:  # SafetensorError derives from Exception only
    raise WeightLoadError(weights, f"unreadable safetensors file ({e})") from None
  model = build_decoder(config, params, source=weights)
  kind = d.get("tokenizer", "none")
  if kind in ("hf", "byte"):
    tokenizer = Tokenizer.from_hf_dir(path)
    if kind == "byte":
      tokenizer = tok_lib.ByteTokenizer()   # same ids; keeps the exact byte semantics
  elif kind == "sentencepiece":
    tokenizer = tok_lib.SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
  else:
    tokenizer = None
  return model, tokenizer, config


# ------------------------------------------------------------------------------ choose ---

FORMATS = ("auto", "hf", "native")


def export_model(model: Decoder, tokenizer, config: ModelConfig | None,
                 out_dir: str | os.PathLike, *, format: str = "auto",
                 dtype: str | None = None, source: str | None = None) -> tuple[str, str]:
  """(path, "hf" | "native"): an HF checkpoint when HF has the architecture (format="auto"
  or "hf"; "hf" raises, naming the feature, when it does not), else the native export."""
  from common import tokenizer as tok_lib

  if format not in FORMATS:
    raise ValueError(f"export: format={format!r}; allowed: {list(FORMATS)}")
  config = config or model.config
  if format == "native" or (format == "auto" and non_hf_reason(config)):
    return export_native(model, tokenizer, config, out_dir, dtype=dtype, source=source), "native"
  if isinstance(tokenizer, tok_lib.SentencePieceTokenizer):
    raise ValueError("export: an HF checkpoint needs an HF tokenizer.json and this model uses "
                     "a SentencePiece model; use format='native'")
  if isinstance(tokenizer, tok_lib.ByteTokenizer):
    tokenizer = byte_tokenizer_as_hf(tokenizer)
  return export_hf(model, tokenizer, config, out_dir, dtype=dtype), "hf"


def export_pretrained(source: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                      step: int | None = None, format: str = "auto",
                      dtype: str | None = None) -> tuple[str, str]:
  """Exports anything `load_pretrained` reads: a train_lm / soft_grpo run folder (newest
  checkpoint, or `step`; `out_dir` defaults to `<run>/export/step_<N>`), an HF dir, a .gguf
  file or an embedded name (`out_dir` required). Returns (path, "hf" | "native")."""
  from common.pretrained import is_run_dir, load_pretrained, run_steps

  source = os.fspath(source)
  run = is_run_dir(os.path.expanduser(source))
  if out_dir is None and not run:
    raise ValueError(f"export: give an output folder for {source!r} (only run folders have a "
                     "default, <run>/export/step_<N>)")
  model, tokenizer, config = load_pretrained(source, "float32", step=step)
  what = source
  if run:
    step = run_steps(os.path.expanduser(source))[-1] if step is None else step
    out_dir = out_dir or os.path.join(os.path.expanduser(source), "export", f"step_{step}")
    what = f"{source} (step {step})"
  return export_model(model, tokenizer, config, out_dir, format=format,
                      dtype=dtype or "float32", source=what)
