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
from common.train import guard as guard_lib
from common.train import lm_setup, lm_step, memory
from common.train import workdir as workdir_lib
from common.train.lm_config import LMConfig
from common.train.metrics import MetricsWriter, NoWriter, to_python

log = logging.getLogger("train_lm")

# Raised when a bad update stops the run (nonfinite='stop', or too many in a row).
NonFiniteLoss = guard_lib.BadUpdate


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
  """What fixes the checkpoint's tree structure and shapes (remat is memory only)."""
  model = {k: v for k, v in mcfg.to_dict().items() if k != "remat"}
  return {"model": model, "adagc": c.stabilizer == "adagc",
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


def train(config, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary dict.

  `config`: the flat ls_lm ConfigDict (or an LMConfig); validated once by LMConfig. With several
  processes (common.distributed), each feeds its rows of every global batch; only process 0
  holds the workdir lock and writes config, metrics and the summary; all join checkpoints.
  A resumed run must keep the config that changes the math unless `allow_config_change`
  (then the change is recorded in config_history.jsonl).
  """
  c = config if isinstance(config, LMConfig) else LMConfig.from_config_dict(config)
  is_main = jax.process_index() == 0
  workdir = workdir_lib.prepare_workdir(workdir)
  lock = workdir_lib.WorkdirLock(workdir).acquire() if is_main else None
  try:
    return _train(c, workdir, allow_config_change=allow_config_change, is_main=is_main)
  finally:
    if lock is not None:
      lock.release()


def _train(c: LMConfig, workdir: str, *, allow_config_change: bool, is_main: bool):
  t_start = time.perf_counter()
  data = build_data(c)
  setup = lm_setup.build(c, data.vocab_size)
  mcfg, mesh, graphdef = setup.model_config, setup.mesh, setup.graphdef
  dp = sharding.data_parallel_size(mesh)

  check_same_run(workdir, c, mcfg)
  loop = c.loop
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=loop.keep_checkpoints,
                               async_save=loop.async_checkpoint)
  restored = ckpt.restore_latest(setup.abstract_state)
  wall_before = 0.0
  if restored is not None:
    start_step, state, extras = restored
    data.train_iter.set_state(extras["train_iter"])
    wall_before = float(extras.get("wall_s", 0.0))
    if is_main:   # always shown (INFO logs are off by default): a resume is worth knowing
      print(f"resumed {workdir} at step {start_step}", file=sys.stderr)
  else:
    start_step = 0
    state = setup.init_state()
  # Stored once at the start; a resumed run is compared with it (changes refused or recorded).
  try:
    changes = workdir_lib.check_config_on_resume(
        workdir, c.to_dict(), step=start_step, allow_change=allow_config_change,
        extra={"model": mcfg.to_dict(), "layout": state_layout(c, mcfg)}, write=is_main)
  except ValueError:
    ckpt.close()
    raise
  if changes:
    log.warning("config changed at step %d: %s", start_step, changes)

  if is_main:
    writer = MetricsWriter(workdir, resume_step=start_step if restored is not None else None,
                           tensorboard=loop.tensorboard)
    if restored is None:
      writer.write_config(c.to_dict(), metric_tags=("train/loss", "val/ppl"))
  else:
    writer = NoWriter()
  step_fns = {stats: setup.train_step(collect_stats=stats) for stats in (True, False)}
  eval_fn = jax.jit(lm_step.make_eval_step(graphdef, c.step.loss_chunk_tokens))
  stats_every = loop.stats_every or loop.log_every
  guard = guard_lib.StepGuard(loop.guard_config())

  tokens_per_step = c.data.batch_size * c.data.grad_accum * c.data.seq_len
  progress = None
  if loop.progress and is_main:
    from tqdm import tqdm
    progress = tqdm(total=loop.num_steps, initial=start_step, desc=os.path.basename(workdir),
                    dynamic_ncols=True, mininterval=1.0)
  last_val, last_stats = None, None
  t_last, steps_since = time.perf_counter(), 0
  step = start_step
  pending_save = False
  t_first = None   # end of this run's first step (compilation excluded from the step time)
  try:
    if loop.memory_check and start_step < loop.num_steps:
      # Issue 15: refuse a micro-batch that cannot fit, before the first step.
      micro = c.data.batch_size
      memory.check_step_fits(
          lambda b: step_fns[True].lower(setup.abstract_state, setup.batch_spec(b)), micro,
                             multiple=dp,
                             limit_bytes=int(loop.memory_limit_gb * memory.GiB) or None)
    while step < loop.num_steps:
      batch = sharding.put_batch(_as_int32(next(data.train_iter)), mesh, leading=1)
      with_stats = (step + 1) % stats_every == 0 or step + 1 == loop.num_steps
      state, m = step_fns[with_stats](state, batch)
      step += 1
      steps_since += 1
      if t_first is None:
        jax.block_until_ready(m["loss"])
        t_first = time.perf_counter()
      if with_stats:
        last_stats = m
      ok = bool(m["finite"])
      if not ok:
        writer.write(step, "train", m)
        guard.after_step(step, False, int(m["bad_reason"]), loss=float(m["loss"]),
                         grad_norm=float(m["grad_norm"]), param_norm=float(m["param_norm"]),
                         prev_param_norm=float(m["prev_param_norm"]))
      else:
        guard.after_step(step, True, 0)
      # Spikes and bad steps are always logged, whatever log_every says.
      if step % loop.log_every == 0 or step == loop.num_steps or bool(m["spike"]):
        now = time.perf_counter()
        tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        last_train = writer.write(step, "train", m) if ok else to_python(m)
        if progress is not None:
          progress.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
      if step % loop.eval_every == 0 or step == loop.num_steps:
        last_val = writer.write(step, "val", evaluate(eval_fn, state, data.val_batches, mesh))
      # Never checkpoint right after a skipped update: save at the next good step instead.
      pending_save |= step % loop.ckpt_every == 0 or step == loop.num_steps
      if pending_save and guard.may_checkpoint:
        ckpt.save(step, state, extras={"train_iter": data.train_iter.get_state(),
                                       "wall_s": wall_before + time.perf_counter() - t_start})
        pending_save = False
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
      "wall_s": wall_before + time.perf_counter() - t_start,
      "wall_s_this_run": time.perf_counter() - t_start,
      # mean seconds per step after this run's first (compiling) step
      "step_s": (None if t_first is None or step - start_step < 2
                 else (time.perf_counter() - t_first) / (step - start_step - 1)),
  }
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
