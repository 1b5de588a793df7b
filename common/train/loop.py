"""The language-model training loop: `train(config, workdir) -> summary`.

The same workdir resumes: orbax checkpoints (params, optimizer state, step, rng, spike EMA,
grain iterator state) in <workdir>/checkpoints, metrics in <workdir>/metrics.jsonl and
TensorBoard events in <workdir>/tb. `config` is the flat ls_lm ConfigDict
(experiments/configs/ls_lm.py); `common.train.lm_config.LMConfig` validates it once, here.

Two jitted steps: one with the attention-stats pass (max |logit| per layer) for the steps that
log (`stats_every`, default `log_every`, and the last step) and one without it for the rest,
so on TPU a non-logging step never pays for an extra XLA score pass.

`import ls_attention` (done by the entry points) registers attention="ls"; common does not
import it.
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
import numpy as np

from common import sharding
from common.config import ModelConfig
from common.train import checkpoint as ckpt_lib
from common.train import lm_step, train_state
from common.train.lm_config import LMConfig
from common.train.metrics import MetricsWriter

log = logging.getLogger("train_lm")


class NonFiniteLoss(RuntimeError):
  """Raised when a step's loss is not finite and config.nonfinite == 'stop'."""


@dataclasses.dataclass
class LMData:
  train_iter: Any          # grain DatasetIterator: {inputs, targets} int [A, B, T]; get/set_state
  val_batches: list        # fixed list of {inputs, targets} int [B, T]
  vocab_size: int


def build_data(c: LMConfig) -> LMData:
  """common.data grain pipelines: packed, deterministic, resumable mid-epoch."""
  from common.data import pipeline, tokens
  d = c.data
  t = d.seq_len
  need = (c.loop.num_steps * d.batch_size * d.grad_accum * t
          + (d.eval_batches * d.batch_size + 2) * t)
  corpus = tokens.load_token_corpus(
      d.data, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
      val_fraction=d.val_fraction, synthetic_order=d.synthetic_order,
      synthetic_tokens=int(min(max(need, 100_000), 20_000_000)), synthetic_seed=c.seed)
  # Each process reads its own slice of every global batch (common.data shards windows).
  procs, proc = jax.process_count(), jax.process_index()
  if d.batch_size % procs:
    raise ValueError(f"data.batch_size: {d.batch_size} is not divisible by the {procs} "
                     "processes; allowed: a multiple of the process count")
  train_ds = pipeline.make_lm_dataset(corpus.train, seq_len=t, batch_size=d.batch_size // procs,
                                      seed=c.seed, accum_steps=d.grad_accum,
                                      num_threads=d.data_workers or 1, shard_index=proc,
                                      shard_count=procs)
  val_ds = pipeline.make_eval_dataset(corpus.val, seq_len=t, batch_size=d.batch_size // procs,
                                      shard_index=proc, shard_count=procs)
  val = []
  for batch in val_ds:
    val.append({k: np.asarray(v) for k, v in batch.items()})
    if len(val) == d.eval_batches:
      break
  return LMData(train_iter=iter(train_ds), val_batches=val, vocab_size=corpus.vocab_size)


def _as_int32(batch) -> dict[str, np.ndarray]:
  return {k: np.asarray(batch[k], np.int32) for k in ("inputs", "targets")}


def evaluate(eval_fn, state, val_batches, mesh) -> dict[str, Any]:
  ce_sum, tokens = 0.0, 0.0
  local_L = global_L = None
  for batch_BxT in val_batches:
    b = sharding.put_batch(_as_int32(batch_BxT), mesh)
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


def state_layout(c: LMConfig, mcfg: ModelConfig) -> dict[str, Any]:
  """What fixes the checkpoint's tree structure and shapes."""
  return {"model": mcfg.to_dict(), "adagc": c.stabilizer == "adagc",
          "global_clip": c.stabilizer != "adagc" and c.optim.grad_clip > 0}


def check_same_run(workdir: str, c: LMConfig, mcfg: ModelConfig) -> None:
  """Resuming needs the same model and optimizer layout; say so instead of failing to read
  (or, worse, quarantining as corrupt) every checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f).get("layout")
  new = json.loads(json.dumps(state_layout(c, mcfg), default=str))
  if old is None or old == new:
    return
  flat = lambda d: {f"{k}.{k2}" if isinstance(v, dict) else k: v2
                    for k, v in d.items() for k2, v2 in (v.items() if isinstance(v, dict)
                                                         else [(None, v)])}
  diff = sorted(k for k in set(flat(old)) | set(flat(new)) if flat(old).get(k) != flat(new).get(k))
  raise ValueError(f"--workdir {workdir} holds a run with a different model/optimizer layout "
                   f"({', '.join(diff)}); use a new workdir to start a new run")


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary dict.

  `config`: the flat ls_lm ConfigDict (or an LMConfig); validated once by LMConfig."""
  c = config if isinstance(config, LMConfig) else LMConfig.from_config_dict(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  data = build_data(c)
  mcfg = c.model_config(data.vocab_size)
  tx, schedule = c.make_optimizer()
  mesh = sharding.make_mesh(c.mesh.mesh_data, c.mesh.mesh_fsdp)
  dp = sharding.data_parallel_size(mesh)
  if c.data.batch_size % dp:
    raise ValueError(f"data.batch_size: {c.data.batch_size} is not divisible by the mesh's "
                     f"data-parallel size {dp}; allowed: a multiple of {dp}")
  graphdef = train_state.model_graphdef(mcfg)
  init_fn = train_state.make_init_fn(mcfg, tx, c.seed)
  abstract = jax.eval_shape(init_fn)
  state_sh = sharding.param_shardings(abstract, mesh, min_size=c.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)

  check_same_run(workdir, c, mcfg)
  loop = c.loop
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=loop.keep_checkpoints,
                               async_save=loop.async_checkpoint)
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
               "layout": state_layout(c, mcfg)}, f, indent=1, default=str)

  writer = MetricsWriter(workdir, resume_step=start_step if restored is not None else None,
                         tensorboard=loop.tensorboard)
  batch_sh = {k: sharding.batch_sharding(mesh, 3, leading=1) for k in ("inputs", "targets")}
  step_fns = {stats: lm_step.jit_train_step(
      lm_step.make_train_step(graphdef, tx, schedule, c.step, collect_stats=stats),
      state_sh, batch_sh, mesh) for stats in (True, False)}
  eval_fn = jax.jit(lm_step.make_eval_step(graphdef))
  stats_every = loop.stats_every or loop.log_every

  tokens_per_step = c.data.batch_size * c.data.grad_accum * c.data.seq_len
  progress = None
  if loop.progress:
    from tqdm import tqdm
    progress = tqdm(total=loop.num_steps, initial=start_step, desc=os.path.basename(workdir),
                    dynamic_ncols=True, mininterval=1.0)
  last_val, last_stats = None, None
  t_last, steps_since = time.perf_counter(), 0
  step = start_step
  try:
    while step < loop.num_steps:
      batch = sharding.put_batch(_as_int32(next(data.train_iter)), mesh, leading=1)
      with_stats = (step + 1) % stats_every == 0 or step + 1 == loop.num_steps
      state, m = step_fns[with_stats](state, batch)
      step += 1
      steps_since += 1
      if with_stats:
        last_stats = m
      finite = bool(m["finite"])
      if not finite:
        loss = float(m["loss"])
        if loop.nonfinite == "stop":
          writer.write(step, "train", m)
          raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}; stopping "
                              "(config.nonfinite='stop'); parameters were not updated")
        print(f"warning: non-finite loss ({loss}) at step {step}; update skipped",
              file=sys.stderr)
      # Spikes and non-finite steps are always logged, whatever log_every says.
      if step % loop.log_every == 0 or step == loop.num_steps or not finite or bool(m["spike"]):
        now = time.perf_counter()
        tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        last_train = writer.write(step, "train", m)
        if progress is not None:
          progress.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
      if step % loop.eval_every == 0 or step == loop.num_steps:
        last_val = writer.write(step, "val", evaluate(eval_fn, state, data.val_batches, mesh))
      if step % loop.ckpt_every == 0 or step == loop.num_steps:
        ckpt.save(step, state, extras={"train_iter": data.train_iter.get_state()})
      if progress is not None:
        progress.update(1)
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    ckpt.close()
  max_logit = lambda k: (None if last_stats is None
                         else float(np.max(np.asarray(last_stats[k]))))
  summary = {
      "workdir": workdir, "steps": step,
      "final_val_loss": None if last_val is None else last_val["loss"],
      "final_val_ppl": None if last_val is None else last_val["ppl"],
      "max_logit_global": max_logit("max_logit_global"),
      "max_logit_local": max_logit("max_logit_local"),
      "num_spikes": int(state.num_spikes), "num_nonfinite": int(state.num_nonfinite),
      "wall_s": time.perf_counter() - t_start,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
