"""Run folders are models: `load_pretrained(<train_lm / soft_grpo workdir>)` restores only the
params of a checkpoint (newest or `step`), rebuilds the model from config.json and the run's
tokenizer; `experiments.export` round-trips (native format for LS / learned positions, HF for
Llama-shaped models) with the same logits; bad folders fail with one line."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ls_attention  # noqa: F401  (registers attention="ls")
from common import load_pretrained, pretrained
from common.config import tiny_config
from common.model import Decoder
from common.tokenizer import ByteTokenizer
from common.train.checkpoint import Checkpointer
from common.train.train_state import TrainState
from common.weights.export import NATIVE_CONFIG, export_pretrained
from common.weights.params import decoder_params
from tests.models import randomized_decoder


def _train_fn():
  try:  # the LM loop's home after issue 8; experiments.train_lm before it
    from common.train.loop import train
  except ImportError:
    from experiments.train_lm import train
  return train


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """A real 4-step train_lm run (LS-attention, learned positions, byte tokens), checkpoints
  at steps 2 and 4."""
  from experiments.configs.ls_lm import get_config
  c = get_config("test")
  c.num_steps, c.ckpt_every, c.eval_every, c.tensorboard = 4, 2, 4, False
  workdir = str(tmp_path_factory.mktemp("lm_run"))
  _train_fn()(c, workdir)
  return workdir


def _ids(vocab, shape=(2, 13), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _stored_params(workdir, step):
  """Reference: the whole checkpointed TrainState read back without a target (numpy)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.PyTreeCheckpointer().restore(path)
  flat = {}
  for p, leaf in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
    flat[".".join(str(k.key) for k in p)] = np.asarray(leaf)
  return flat


def test_lm_run_newest_and_step(lm_run, monkeypatch):
  restored_items = []
  real = ocp.PyTreeCheckpointHandler.restore

  def spy(self, directory, args=None):
    restored_items.append(sorted(args.item))
    return real(self, directory, args=args)

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", spy)
  model, tok, cfg = load_pretrained(lm_run)
  assert isinstance(tok, ByteTokenizer)
  assert (cfg.attention, cfg.position_embedding, cfg.vocab_size) == ("ls", "learned", 258)
  monkeypatch.undo()
  assert restored_items == [["params"]]          # the optimizer state is never read
  got = decoder_params(model)
  want = _stored_params(lm_run, 4)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  older, _, _ = load_pretrained(lm_run, step=2)
  for k, v in _stored_params(lm_run, 2).items():
    np.testing.assert_array_equal(decoder_params(older)[k], v, err_msg=k)
  ids = _ids(258)
  assert not np.allclose(np.asarray(model(ids)[0]), np.asarray(older(ids)[0]))


def test_lm_run_errors(lm_run, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3; available steps: "
                     r"\[2, 4\]") as e:
    load_pretrained(lm_run, step=3)
  assert "\n" not in str(e.value)

  bare = tmp_path / "no_ckpt"
  os.makedirs(bare / "checkpoints")
  shutil.copy(os.path.join(lm_run, "config.json"), bare / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoints in the run folder"):
    load_pretrained(bare)

  no_cfg = tmp_path / "no_cfg"
  shutil.copytree(os.path.join(lm_run, "checkpoints"), no_cfg / "checkpoints")
  with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
    load_pretrained(no_cfg)
  (no_cfg / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config.json: cannot parse JSON") as e:
    load_pretrained(no_cfg)
  assert "\n" not in str(e.value)
  (no_cfg / "config.json").write_text(json.dumps({"config": {}}))
  with pytest.raises(ValueError, match="no model config"):
    load_pretrained(no_cfg)

  with pytest.raises(ValueError, match="applies only to a train_lm/soft_grpo run folder"):
    load_pretrained(str(tmp_path), step=2)


def test_lm_run_native_export_round_trip(lm_run, tmp_path):
  path, kind = export_pretrained(lm_run, tmp_path / "out")
  assert kind == "native"
  assert sorted(os.listdir(path)) == sorted(
      ["README.txt", NATIVE_CONFIG, "model.safetensors", "tokenizer.json",
       "tokenizer_config.json"])
  readme = open(os.path.join(path, "README.txt")).read()
  assert "HF transformers CANNOT run it" in readme
  assert "attention='ls'" in readme and "position_embedding='learned'" in readme
  assert not os.path.exists(os.path.join(path, "config.json"))  # no HF loader is fooled

  model, tok, cfg = load_pretrained(lm_run)
  again, tok2, cfg2 = load_pretrained(path)
  assert cfg2 == cfg and isinstance(tok2, ByteTokenizer)
  ids = _ids(258)
  np.testing.assert_array_equal(np.asarray(again(ids)[0]), np.asarray(model(ids)[0]))

  # The CLI: default output inside the run folder; a step that does not exist is one line.
  from experiments import export as export_cli
  assert export_cli.export(lm_run, step=2) == 0
  assert os.path.isfile(os.path.join(lm_run, "export", "step_2", "model.safetensors"))
  assert export_cli.export(lm_run, step=7) == 1


def _write_run(workdir, model, config_json, *, steps=(3,), grpo=False):
  """A run folder as the trainers write it: TrainState checkpoints + config.json."""
  _, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  state = TrainState.create(params=params, optimizer=optax.adamw(1e-3), seed=0,
                            ref_params=jax.tree.map(jnp.copy, params) if grpo else None)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  for s in steps:
    ckpt.save(s, state.replace(step=jnp.int32(s)))
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f)
  return workdir


def test_grpo_run_tiny_with_model_config(tmp_path):
  tok = ByteTokenizer()
  cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512,
                    eos_token_id=tok.eos_id)
  model = randomized_decoder(cfg, 1)
  run = _write_run(str(tmp_path / "grpo"), model, {
      "model": {"name": "tiny", "dtype": "float32"}, "model_config": cfg.to_dict(),
      "grpo": {"group_size": 2}, "seed": 0}, grpo=True)
  again, tok2, cfg2 = load_pretrained(run)
  assert cfg2 == cfg and isinstance(tok2, ByteTokenizer)
  ids = _ids(tok.vocab_size)
  np.testing.assert_array_equal(np.asarray(again(ids)[0]), np.asarray(model(ids)[0]))

  # The pre-issue-8 layout (flat ConfigDict: `model` is the name) reads the same way.
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump({"model": "tiny", "dtype": "float32", "model_config": cfg.to_dict()}, f)
  np.testing.assert_array_equal(np.asarray(load_pretrained(run)[0](ids)[0]),
                                np.asarray(model(ids)[0]))
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump({"model": {"name": "tiny", "dtype": "float32"}}, f)
  with pytest.raises(ValueError, match="model.name='tiny' without 'model_config'"):
    load_pretrained(run)


def test_grpo_run_of_an_hf_base_model(tiny_hf_checkpoints, tmp_path):
  """soft_grpo's config.json names its base (model.name): architecture and tokenizer come
  from there, the weights from the run's checkpoint."""
  base = tiny_hf_checkpoints["qwen2"].path
  base_model, base_tok, base_cfg = load_pretrained(base)
  trained = randomized_decoder(base_cfg, 5)
  run = _write_run(str(tmp_path / "grpo_hf"), trained,
                   {"model": {"name": base, "dtype": "float32"}, "seed": 0}, grpo=True)
  again, tok, cfg = load_pretrained(run)
  assert cfg == base_cfg
  assert tok.encode("the quick fox") == base_tok.encode("the quick fox")
  ids = _ids(base_cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(again(ids)[0]), np.asarray(trained(ids)[0]))
  assert not np.allclose(np.asarray(again(ids)[0]), np.asarray(base_model(ids)[0]))


def test_llama_shaped_run_exports_as_hf(tmp_path):
  """An MHSA + RoPE LM run with byte tokens: an HF checkpoint transformers runs, with a
  byte tokenizer.json that gives the ByteTokenizer's ids."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  cfg = tiny_config(vocab_size=258, tie_word_embeddings=True)
  model = randomized_decoder(cfg, 2)
  run = _write_run(str(tmp_path / "lm_mhsa"), model, {
      "config": {"tokenizer": "byte", "data": "stdlib"}, "model": cfg.to_dict()})
  path, kind = export_pretrained(run, tmp_path / "hf")
  assert kind == "hf"
  hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = np.asarray(_ids(258))
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(model(jnp.asarray(ids))[0]), atol=1e-4, rtol=0)
  text = "héllo wörld 🤗\n  x = 1"
  assert AutoTokenizer.from_pretrained(path).encode(text) == list(text.encode("utf-8"))
  again, tok, _ = load_pretrained(path)
  assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))[0]),
                                np.asarray(model(jnp.asarray(ids))[0]))


def test_generate_from_a_run_folder(lm_run, tiny_hf_checkpoints):
  """What `experiments.generate --model=<run> --step=N` does: load, encode, sample, decode."""
  from common.sampler import SamplingConfig, generate, trim

  model, tok, _ = load_pretrained(lm_run, step=2)
  ids = pretrained.prompt_ids(tok, "def f(x):")       # bytes: no chat template to apply
  assert ids == list(b"def f(x):")
  cfg = SamplingConfig(max_new_tokens=5, greedy=True, eos_ids=tuple(tok.eos_ids))
  rows = trim(generate(model, [ids], cfg))
  assert 1 <= len(rows[0]) <= 5 and all(0 <= t < 258 for t in rows[0])
  # Greedy decoding agrees with the argmax of a full forward pass at the first new token.
  logits = np.asarray(model(jnp.asarray([ids]))[0])[0, -1]
  assert rows[0][0] == int(np.argmax(logits))
  with pytest.raises(ValueError, match="trained on token ids only"):
    pretrained.prompt_ids(None, "x")
  hf_tok = load_pretrained(tiny_hf_checkpoints["llama"].path)[1]
  chat = pretrained.prompt_ids(hf_tok, "hi", system="be brief")
  assert chat == hf_tok.encode(hf_tok.apply_chat_template(
      [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]))


def test_run_tokenizer_copied_into_the_folder(lm_run, tmp_path, tiny_hf_checkpoints):
  """`write_run_tokenizer` (called by trainers) makes the folder self-contained: a
  SentencePiece model or an HF tokenizer placed there wins over config.json's field, and a
  tokenizer with more ids than the model is refused."""
  from common.data.corpus import open_corpus
  from common.tokenizer import SentencePieceTokenizer, make_tokenizer

  run = tmp_path / "run"
  shutil.copytree(lm_run, run)
  assert pretrained.write_run_tokenizer(str(run), ByteTokenizer()) is None
  hf_tok = load_pretrained(tiny_hf_checkpoints["llama"].path)[1]   # 320 ids > 258: refused
  assert pretrained.write_run_tokenizer(str(run), hf_tok) == str(run / "tokenizer.json")
  with pytest.raises(ValueError, match="tokenizer has 320 ids but the model only 258"):
    load_pretrained(str(run))

  text = tmp_path / "corpus.txt"
  text.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(300)))
  sp = make_tokenizer("sentencepiece", corpus=open_corpus(str(text)), vocab_size=400,
                      cache_dir=str(tmp_path / "cache"), sample_chars=20_000)
  cfg = tiny_config(vocab_size=sp.vocab_size)
  model = randomized_decoder(cfg, 3)
  sp_run = _write_run(str(tmp_path / "sp_run"), model, {
      "config": {"tokenizer": "sentencepiece", "data": str(text), "vocab_size": 400},
      "model": cfg.to_dict()})
  with pytest.raises(FileNotFoundError, match="SentencePiece model is not in the cache"):
    load_pretrained(sp_run)                      # never silently retrained
  assert pretrained.write_run_tokenizer(sp_run, sp) == os.path.join(sp_run, "tokenizer.model")
  again, tok, _ = load_pretrained(sp_run)
  assert isinstance(tok, SentencePieceTokenizer)
  assert tok.encode("def add(a, b):") == sp.encode("def add(a, b):")
  path, kind = export_pretrained(sp_run, tmp_path / "sp_export", format="native")
  assert kind == "native" and os.path.isfile(os.path.join(path, "tokenizer.model"))
  back, tok2, _ = load_pretrained(path)
  assert tok2.encode("return a + b") == sp.encode("return a + b")
  ids = _ids(cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(back(ids)[0]), np.asarray(model(ids)[0]))


def test_dtype_accepts_jax_and_numpy_dtypes():
  import jax.numpy as jnp
  import numpy as np
  from common.layers import dtype_name
  assert dtype_name(jnp.bfloat16) == "bfloat16" and dtype_name(np.float32) == "float32"
  assert dtype_name(np.dtype("float16")) == "float16" and dtype_name("float32") == "float32"
  from common import load_pretrained
  with pytest.raises(ValueError, match="dtype must be one of"):
    load_pretrained("smollm2-135m", dtype=jnp.int32)
