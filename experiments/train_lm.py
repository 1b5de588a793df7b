"""LS-attention / MHSA language-model trainer (issue 4).

  python -m experiments.train_lm --config=experiments/configs/ls_lm.py:cpu_small \
      --config.attention=ls --config.stabilizer=none --workdir=runs/x

The same workdir resumes: orbax checkpoints (params, optimizer state, step, rng, spike EMA,
grain iterator state) in <workdir>/checkpoints, metrics in <workdir>/metrics.jsonl and
TensorBoard events in <workdir>/tb. `train(config, workdir)` is the library entry point
(used by experiments/ls_demo.py and the tests); `main` only adds flags and one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import ConfigDict, config_flags

import ls_attention  # noqa: F401  (registers attention="ls")
from common.config import ModelConfig
from common.train import checkpoint as ckpt_lib
from common import sharding
from common.train import lm_step, train_state
from common.train.metrics import MetricsWriter

log = logging.getLogger("train_lm")

ATTENTIONS = ("ls", "mhsa")
STABILIZERS = ("none", "qk_norm", "z_loss", "adagc", "softcap")
NONFINITE = ("skip", "stop")
DTYPES = ("float32", "bfloat16")


class NonFiniteLoss(RuntimeError):
  """Raised when a step's loss is not finite and config.nonfinite == 'stop'."""


# ----------------------------------------------------------------------------- config ---


def validate_config(c: ConfigDict) -> None:
  """One-line ValueErrors naming the field and the allowed values."""
  def one_of(name, allowed):
    if c[name] not in allowed:
      raise ValueError(f"config.{name}={c[name]!r} is not one of {list(allowed)}")

  def positive(*names):
    for name in names:
      if not isinstance(c[name], int) or isinstance(c[name], bool) or c[name] < 1:
        raise ValueError(f"config.{name} must be a positive int, got {c[name]!r}")

  one_of("attention", ATTENTIONS)
  one_of("stabilizer", STABILIZERS)
  one_of("nonfinite", NONFINITE)
  one_of("compute_dtype", DTYPES)
  positive("num_layers", "d_model", "num_heads", "head_dim", "mlp_dim", "seq_len",
           "batch_size", "grad_accum", "num_steps", "log_every", "eval_every", "ckpt_every",
           "keep_checkpoints", "eval_batches", "max_position_embeddings")
  if c.position_embedding == "learned" and c.seq_len > c.max_position_embeddings:
    raise ValueError(f"config.seq_len={c.seq_len} does not fit the learned positions "
                     f"(config.max_position_embeddings={c.max_position_embeddings})")
  if c.attention == "ls":
    if not 0 <= c.num_local_heads < c.num_heads:
      raise ValueError(f"config.num_local_heads={c.num_local_heads} must be in "
                       f"[0, {c.num_heads - 1}] (LS keeps at least one global head)")
    if c.num_local_heads and c.window < 1:
      raise ValueError(f"config.window must be >= 1, got {c.window}")
  for name in ("lr", "min_lr", "weight_decay", "grad_clip", "z_loss_coef", "spike_threshold"):
    if not (isinstance(c[name], (int, float)) and c[name] >= 0 and math.isfinite(c[name])):
      raise ValueError(f"config.{name} must be a finite number >= 0, got {c[name]!r}")
  if c.warmup_steps < 0:
    raise ValueError(f"config.warmup_steps must be >= 0, got {c.warmup_steps}")
  if c.stabilizer == "softcap" and not c.softcap > 0:
    raise ValueError(f"config.softcap must be > 0 for stabilizer='softcap', got {c.softcap}")
  if not 0 <= c.spike_ema_decay < 1:
    raise ValueError(f"config.spike_ema_decay must be in [0, 1), got {c.spike_ema_decay}")
  _validate_data_config(c)


def model_config(c: ConfigDict, vocab_size: int) -> ModelConfig:
  """The decoder for this run; the stabilizers that live in attention are switched here."""
  return ModelConfig(
      vocab_size=vocab_size, d_model=c.d_model, num_layers=c.num_layers,
      num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.head_dim,
      mlp_dim=c.mlp_dim, position_embedding=c.position_embedding,
      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
      attention=c.attention,
      num_local_heads=c.num_local_heads if c.attention == "ls" else 0,
      window=c.window if c.attention == "ls" else 0,
      qk_norm=c.stabilizer == "qk_norm",
      attn_logits_soft_cap=float(c.softcap) if c.stabilizer == "softcap" else None,
      attention_impl=c.attention_impl, dtype=c.compute_dtype, param_dtype="float32")


def step_config(c: ConfigDict) -> lm_step.StepConfig:
  return lm_step.StepConfig(
      z_loss_coef=float(c.z_loss_coef) if c.stabilizer == "z_loss" else 0.0,
      spike_threshold=float(c.spike_threshold), spike_ema_decay=float(c.spike_ema_decay),
      inject_nan_at_step=int(c.inject_nan_at_step))


def build_optimizer(c: ConfigDict):
  """AdamW with linear warmup + cosine decay; global-norm clipping, or AdaGC in its place
  for stabilizer='adagc' (AdaGC replaces global clipping, Wang et al. 2025)."""
  from common.optim import make_optimizer
  return make_optimizer(
      lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps, total_steps=c.num_steps,
      b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, grad_clip=c.grad_clip,
      adagc=c.stabilizer == "adagc", adagc_beta=c.adagc_beta, adagc_lambda=c.adagc_lambda,
      adagc_warmup_steps=c.adagc_warmup_steps)


# ------------------------------------------------------------------ data, optimizer ---


@dataclasses.dataclass
class LMData:
  train_iter: Any          # grain DatasetIterator: {inputs, targets} int [A, B, T]; get/set_state
  val_batches: list        # fixed list of {inputs, targets} int [B, T]
  vocab_size: int


def _validate_data_config(c: ConfigDict) -> None:
  if c.data not in ("stdlib", "synthetic") and not os.path.exists(c.data):
    raise ValueError(f"config.data={c.data!r}: no such corpus path "
                     "(use 'stdlib', 'synthetic' or an existing file/folder)")
  if c.data == "synthetic" and not (isinstance(c.synthetic_order, int) and c.synthetic_order >= 1):
    raise ValueError(f"config.synthetic_order must be a positive int, got {c.synthetic_order!r}")


def build_data(c: ConfigDict) -> LMData:
  """common.data grain pipelines: packed, deterministic, resumable mid-epoch."""
  from common.data import pipeline, tokens
  t = c.seq_len
  need = c.num_steps * c.batch_size * c.grad_accum * t + (c.eval_batches * c.batch_size + 2) * t
  corpus = tokens.load_token_corpus(
      c.data, tokenizer=c.tokenizer, vocab_size=c.vocab_size,
      val_fraction=c.val_fraction, synthetic_order=c.synthetic_order,
      synthetic_tokens=int(min(max(need, 100_000), 20_000_000)), synthetic_seed=c.seed)
  # Each process reads its own slice of every global batch (common.data shards windows).
  procs, proc = jax.process_count(), jax.process_index()
  if c.batch_size % procs:
    raise ValueError(f"config.batch_size={c.batch_size} is not divisible by the {procs} processes")
  train_ds = pipeline.make_lm_dataset(corpus.train, seq_len=t, batch_size=c.batch_size // procs,
                                      seed=c.seed, accum_steps=c.grad_accum,
                                      num_threads=c.data_workers or 1, shard_index=proc,
                                      shard_count=procs)
  val_ds = pipeline.make_eval_dataset(corpus.val, seq_len=t, batch_size=c.batch_size // procs,
                                      shard_index=proc, shard_count=procs)
  val = []
  for batch in val_ds:
    val.append({k: np.asarray(v) for k, v in batch.items()})
    if len(val) == c.eval_batches:
      break
  return LMData(train_iter=iter(train_ds), val_batches=val, vocab_size=corpus.vocab_size)


# ------------------------------------------------------------------------------ train ---


def _as_int32(batch) -> dict[str, np.ndarray]:
  return {k: np.asarray(batch[k], np.int32) for k in ("inputs", "targets")}


def _evaluate(eval_fn, state, val_batches, mesh) -> dict[str, Any]:
  ce_sum, tokens = 0.0, 0.0
  local_L = global_L = None
  for batch_BxT in val_batches:
    b = sharding.put_batch(_as_int32(batch_BxT), mesh, leading=0)
    out = jax.device_get(eval_fn(state.params, state.model_rest, b))
    ce_sum += float(out["ce_sum"])
    tokens += float(out["tokens"])
    local_L = out["max_logit_local"] if local_L is None else np.maximum(local_L,
                                                                       out["max_logit_local"])
    global_L = out["max_logit_global"] if global_L is None else np.maximum(
        global_L, out["max_logit_global"])
  loss = ce_sum / max(tokens, 1.0)
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
          "max_logit_local": local_L, "max_logit_global": global_L}


def _state_layout(c: ConfigDict, mcfg: ModelConfig) -> dict[str, Any]:
  """What fixes the checkpoint's tree structure and shapes."""
  return {"model": mcfg.to_dict(), "adagc": c.stabilizer == "adagc",
          "global_clip": c.stabilizer != "adagc" and c.grad_clip > 0}


def _check_same_run(workdir: str, c: ConfigDict, mcfg: ModelConfig) -> None:
  """Resuming needs the same model and optimizer layout; say so instead of failing to read
  (or, worse, quarantining as corrupt) every checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f).get("layout")
  new = json.loads(json.dumps(_state_layout(c, mcfg), default=str))
  if old is None or old == new:
    return
  flat = lambda d: {f"{k}.{k2}" if isinstance(v, dict) else k: v2
                    for k, v in d.items() for k2, v2 in (v.items() if isinstance(v, dict)
                                                         else [(None, v)])}
  diff = sorted(k for k in set(flat(old)) | set(flat(new)) if flat(old).get(k) != flat(new).get(k))
  raise ValueError(f"--workdir {workdir} holds a run with a different model/optimizer layout "
                   f"({', '.join(diff)}); use a new workdir to start a new run")


def train(c: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary dict."""
  validate_config(c)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  data = build_data(c)
  mcfg = model_config(c, data.vocab_size)
  tx, schedule = build_optimizer(c)
  mesh = sharding.make_mesh(c.mesh_data, c.mesh_fsdp)
  dp = sharding.data_parallel_size(mesh)
  if c.batch_size % dp:
    raise ValueError(f"config.batch_size={c.batch_size} is not divisible by the mesh's "
                     f"data-parallel size {dp}")
  graphdef = train_state.model_graphdef(mcfg)
  init_fn = train_state.make_init_fn(mcfg, tx, c.seed)
  abstract = jax.eval_shape(init_fn)
  state_sh = sharding.param_shardings(abstract, mesh, min_size=c.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)

  _check_same_run(workdir, c, mcfg)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints,
                               async_save=c.async_checkpoint)
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    start_step, state, extras = restored
    data.train_iter.set_state(extras["train_iter"])
    log.info("resumed %s at step %d", workdir, start_step)
  else:
    start_step = 0
    state = jax.jit(init_fn, out_shardings=state_sh)()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"config": c.to_dict(), "model": mcfg.to_dict(),
               "layout": _state_layout(c, mcfg)}, f, indent=1, default=str)

  writer = MetricsWriter(workdir, resume_step=start_step if restored is not None else None,
                         tensorboard=c.tensorboard)
  batch_sh = {k: sharding.batch_sharding(mesh, 3, leading=1) for k in ("inputs", "targets")}
  step_fn = lm_step.jit_train_step(
      lm_step.make_train_step(graphdef, tx, schedule, step_config(c)), state_sh, batch_sh, mesh)
  eval_fn = jax.jit(lm_step.make_eval_step(graphdef))
  val_batches = data.val_batches

  tokens_per_step = c.batch_size * c.grad_accum * c.seq_len
  progress = None
  if c.progress:
    from tqdm import tqdm
    progress = tqdm(total=c.num_steps, initial=start_step, desc=os.path.basename(workdir),
                    dynamic_ncols=True, mininterval=1.0)
  last_val, last_train = None, None
  t_last, steps_since = time.perf_counter(), 0
  step = start_step
  try:
    while step < c.num_steps:
      batch = sharding.put_batch(_as_int32(next(data.train_iter)), mesh, leading=1)
      state, m = step_fn(state, batch)
      step += 1
      steps_since += 1
      finite = bool(m["finite"])
      if not finite:
        loss = float(m["loss"])
        if c.nonfinite == "stop":
          writer.write(step, "train", m)
          raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}; stopping "
                              "(config.nonfinite='stop'); parameters were not updated")
        print(f"warning: non-finite loss ({loss}) at step {step}; update skipped",
              file=sys.stderr)
      # Spikes and non-finite steps are always logged, whatever log_every says.
      if step % c.log_every == 0 or step == c.num_steps or not finite or bool(m["spike"]):
        now = time.perf_counter()
        tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        last_train = writer.write(step, "train", m)
        if progress is not None:
          progress.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
      if step % c.eval_every == 0 or step == c.num_steps:
        last_val = writer.write(step, "val", _evaluate(eval_fn, state, val_batches, mesh))
      if step % c.ckpt_every == 0 or step == c.num_steps:
        ckpt.save(step, state, extras={"train_iter": data.train_iter.get_state()})
      if progress is not None:
        progress.update(1)
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    ckpt.close()
  summary = {
      "workdir": workdir, "steps": step,
      "final_val_loss": None if last_val is None else last_val["loss"],
      "final_val_ppl": None if last_val is None else last_val["ppl"],
      "max_logit_global": float(np.max(np.asarray(m["max_logit_global"]))) if step > start_step
      else None,
      "max_logit_local": float(np.max(np.asarray(m["max_logit_local"]))) if step > start_step
      else None,
      "num_spikes": int(state.num_spikes), "num_nonfinite": int(state.num_nonfinite),
      "wall_s": time.perf_counter() - t_start,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


# -------------------------------------------------------------------------------- CLI ---

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so importing `train` (e.g. from the demo or
  another experiment module) never collides with other modules' flags."""
  config_flags.DEFINE_config_file(
      "config", "experiments/configs/ls_lm.py:cpu_small", "ls_lm config file and preset.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); resumes if present.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    summary = train(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0


def _parse_flags(argv):
  """absl's parser, but a bad --config (unknown preset, unparsable value) is one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    print(f"error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown field>
    print(f"error: unknown config field {str(e).strip(chr(34))}; see the config file's fields",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
