"""HF checkpoint import: logits parity with transformers (tiny random Llama / Qwen2, single
file and sharded), tokenizer parity, and one-line errors naming the file."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from common import load_pretrained
from common.weights.errors import WeightLoadError

B, T = 2, 23


def _hf_logits(hf_model, ids):
  import torch
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_logits_match_transformers(tiny_hf_checkpoints, jax_logits, arch, sharded):
  ckpt = tiny_hf_checkpoints[arch]
  model, tok, cfg = load_pretrained(ckpt.sharded_path if sharded else ckpt.path)
  assert cfg.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
  assert cfg.qkv_bias == (arch == "qwen2")
  assert cfg.tie_word_embeddings == (arch == "qwen2")
  if arch == "llama":
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 5000.0
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
  ours = jax_logits(model, ids)
  theirs = _hf_logits(ckpt.hf_model, ids)
  assert np.abs(theirs).max() > 1.0  # real signal, not near-zero logits
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_tokenizer_matches_transformers(tiny_hf_checkpoints):
  ckpt = tiny_hf_checkpoints["llama"]
  _, tok, _ = load_pretrained(ckpt.path)
  hf_tok = ckpt.hf_tokenizer
  assert tok.bos_id == hf_tok.bos_token_id and tok.eos_id == hf_tok.eos_token_id
  for text in ["The quick brown fox", "def add(a, b):\n  return a+b", "naïve 日本語 🤗", "3.14159"]:
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🤗"}]
  rendered = tok.apply_chat_template(msgs)
  assert rendered == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert rendered.startswith("<s><|system|>") and rendered.endswith("<|assistant|>")
  # The template writes BOS itself: encoding the rendered chat must not double it.
  assert tok.encode_chat(msgs) == tok.encode(rendered)
  assert tok.encode_chat(msgs)[:2] != [tok.bos_id, tok.bos_id]


def _assert_one_line(excinfo, path_fragment):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  assert path_fragment in msg, msg
  err = excinfo.value  # no chained traceback: neither a cause nor a shown context
  assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
  return msg


def test_missing_path(tmp_path):
  path = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(FileNotFoundError) as e:
    load_pretrained(path)
  assert "no such file or directory" in _assert_one_line(e, path)


def test_unsupported_architecture(tiny_hf_checkpoints, tmp_path):
  d = tmp_path / "mistral"
  shutil.copytree(tiny_hf_checkpoints["llama"].path, d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["architectures"] = ["GPTNeoXForCausalLM"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError) as e:
    load_pretrained(str(d))
  msg = _assert_one_line(e, str(d / "config.json"))
  assert "GPTNeoXForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_truncated_safetensors(tiny_hf_checkpoints, tmp_path):
  d = tmp_path / "truncated"
  shutil.copytree(tiny_hf_checkpoints["llama"].path, d)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(ValueError) as e:
    load_pretrained(str(d))
  assert "truncated" in _assert_one_line(e, str(f))


def test_missing_shard_and_missing_tensor(tiny_hf_checkpoints, tmp_path):
  d = tmp_path / "sharded"
  shutil.copytree(tiny_hf_checkpoints["qwen2"].sharded_path, d)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  shard = index["weight_map"]["model.norm.weight"]
  os.remove(d / shard)
  with pytest.raises(FileNotFoundError) as e:
    load_pretrained(str(d))
  _assert_one_line(e, shard)

  # Same shard dropped from the index too: now a tensor is missing.
  index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(WeightLoadError) as e:
    load_pretrained(str(d))
  assert "missing tensor" in _assert_one_line(e, str(d))


def test_bfloat16_load(tiny_hf_checkpoints):
  ckpt = tiny_hf_checkpoints["qwen2"]
  model, _, cfg = load_pretrained(ckpt.path, dtype="bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  got = model.layers[1].self_attn.k_proj.kernel[...]
  assert got.dtype == jnp.bfloat16
  want = ckpt.hf_model.model.layers[1].self_attn.k_proj.weight.detach().numpy().T
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                np.asarray(jnp.asarray(want, jnp.bfloat16).astype(jnp.float32)))


# ----- hostile config.json: one line, before any tensor is read or the model is built -----------

def _with_config(src, dst, **changes):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  cfg.update(changes)
  (dst / "config.json").write_text(json.dumps(cfg))
  return str(dst)


@pytest.mark.parametrize("changes, fragment", [
    # 400 layers over 2-layer weights: the names are checked from the headers (main built a
    # 400-layer model first, 188 s).
    (dict(num_hidden_layers=400), "missing tensor(s) for layers.2.input_layernorm.weight, "),
    (dict(num_hidden_layers=5000), "num_hidden_layers=5000 is out of range; allowed: an integer "
                                   "in [1, 1024]"),
    (dict(num_attention_heads=0), "num_attention_heads=0 is out of range"),  # ZeroDivisionError
    (dict(num_attention_heads=-4), "num_attention_heads=-4 is out of range"),
    (dict(hidden_size=0), "hidden_size=0 is out of range"),
    (dict(vocab_size=10 ** 12), "vocab_size=1000000000000 is out of range"),
    (dict(intermediate_size="96"), "intermediate_size='96' is out of range"),
    (dict(max_position_embeddings=True), "max_position_embeddings=True is out of range"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of "
                                  "num_key_value_heads=3"),
    (dict(intermediate_size=97), "tensor for layers.0.mlp.down_proj.kernel has shape (96, 64), "
                                 "the config implies (97, 64)"),
])
def test_hostile_config_fails_before_loading(tiny_hf_checkpoints, tmp_path, monkeypatch, changes,
                                             fragment):
  from common.weights import hf as hf_lib
  d = _with_config(tiny_hf_checkpoints["llama"].path, tmp_path / "hostile", **changes)
  monkeypatch.setattr(hf_lib, "build_decoder",
                      lambda *a, **k: pytest.fail("the model was built before the check"))
  monkeypatch.setattr(hf_lib, "read_safetensors",
                      lambda *a, **k: pytest.fail("tensor data was read before the check"))
  with pytest.raises(ValueError) as e:
    load_pretrained(d)
  assert fragment in _assert_one_line(e, d), str(e.value)


def test_expected_shapes_match_the_traced_model():
  # The cheap per-layer expansion used for the early check equals the full abstract trace.
  from common.config import tiny_config
  from common.weights.params import expected_shapes, param_shapes
  for cfg in (tiny_config(num_layers=3), tiny_config(tie_word_embeddings=False, qkv_bias=True),
              tiny_config(position_embedding="learned", qk_norm=True)):
    assert expected_shapes(cfg) == param_shapes(cfg)


def test_config_size_limits():
  from common.config import tiny_config
  for field, bad in (("num_layers", 0), ("num_layers", 5000), ("num_heads", -1),
                     ("vocab_size", True), ("max_position_embeddings", 1 << 30)):
    with pytest.raises(ValueError, match=rf"^model\.{field}: got .*; allowed: a positive int <= "):
      tiny_config(**{field: bad})
