"""SofT-GRPO / GRPO training entry point (issue 5).

  python -m experiments.soft_grpo --config=experiments/configs/soft_grpo.py:cpu_small \
      --config.mode=soft_gumbel|discrete --config.model=smollm2-135m|<HF dir> --workdir=runs/x

The same workdir resumes: orbax checkpoints of (params, optimizer state, reference params,
rng, step) plus the data position in <workdir>/checkpoints; metrics in
<workdir>/metrics.jsonl and TensorBoard events in <workdir>/tb. `train(config, workdir)` is
the library entry point (grpo_demo and the tests call it); `main` adds flags and one-line
errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from common import sharding as sharding_lib
from soft_grpo import tasks as tasks_lib
from soft_grpo.loss import LossConfig
from soft_grpo.rollout import MODES, RolloutConfig
from soft_grpo.trainer import (THINK_SYSTEM, ByteTokenizer, GRPOConfig, Trainer, TrainState,
                               init_state, think_end_ids)

log = logging.getLogger("soft_grpo")

PROMPT_STYLES = ("chat", "plain", "bare")


# ----------------------------------------------------------------------------- config


def validate_config(c: ConfigDict) -> None:
  """One-line ValueErrors naming the field and the allowed values (the rest is checked by
  the dataclasses it builds, with `config.<field>` in the message)."""
  if c.mode not in MODES:
    raise ValueError(f"config.mode={c.mode!r} is not one of {list(MODES)}")
  if c.get("prompt", "chat") not in PROMPT_STYLES:
    raise ValueError(f"config.prompt={c.prompt!r} is not one of {list(PROMPT_STYLES)}")
  if c.answer_format not in ("boxed", "last_number"):
    raise ValueError(f"config.answer_format={c.answer_format!r} is not one of "
                     "['boxed', 'last_number']")
  for name in ("max_new_tokens", "group_size", "prompts_per_step", "mini_batch_prompts",
               "num_steps", "max_prompt_len", "checkpoint_every", "keep_checkpoints",
               "ppo_epochs", "top_k"):
    v = c[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_steps" else 1):
      raise ValueError(f"config.{name} must be a positive int, got {v!r}")
  for name in ("learning_rate", "weight_decay", "kl_coef", "entropy_coef", "noise_factor",
               "cold_stop_entropy", "reward_deadline_s"):
    if not isinstance(c[name], (int, float)) or c[name] < 0:
      raise ValueError(f"config.{name} must be a number >= 0, got {c[name]!r}")
  for name in ("temperature", "tau", "eval_tau", "grad_clip"):
    if not isinstance(c[name], (int, float)) or c[name] <= 0:
      raise ValueError(f"config.{name} must be a number > 0, got {c[name]!r}")
  for name in ("top_p", "answer_top_p"):
    if not isinstance(c[name], (int, float)) or not 0 < c[name] <= 1:
      raise ValueError(f"config.{name} must be in (0, 1], got {c[name]!r}")
  if c.top_k < 2:
    raise ValueError(f"config.top_k must be >= 2, got {c.top_k}")
  if c.prompts_per_step % c.mini_batch_prompts:
    raise ValueError(f"config.mini_batch_prompts={c.mini_batch_prompts} must divide "
                     f"config.prompts_per_step={c.prompts_per_step}")
  if c.group_size < 2:
    raise ValueError(f"config.group_size must be >= 2, got {c.group_size}")
  if not 0 <= c.think_budget <= c.max_new_tokens - 1:
    raise ValueError(f"config.think_budget must be in [0, max_new_tokens - len(think_end "
                     f"pieces)], got {c.think_budget} with max_new_tokens={c.max_new_tokens}")
  if c.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={c.dtype!r} is not one of ['float32', 'bfloat16']")


def _wrap(fn, *args, **kwargs):
  """Builds a dataclass, re-raising its ValueError as a `config.`-prefixed one-liner."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    msg = str(e).splitlines()[0]
    for cls in ("RolloutConfig.", "GRPOConfig.", "LossConfig."):
      msg = msg.replace(cls, "config.")
    raise ValueError(msg if msg.startswith("config.") else f"config: {msg}") from None


def load_model(c: ConfigDict):
  """(graphdef, params pure dict, tokenizer, model config)."""
  from flax import nnx
  if c.model == "tiny":
    from common.config import tiny_config
    from common.model import Decoder
    tok = ByteTokenizer()
    mcfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512,
                       eos_token_id=tok.eos_id)
    model = Decoder(mcfg, rngs=nnx.Rngs(c.seed))
  else:
    from common import load_pretrained
    model, tok, mcfg = load_pretrained(c.model, c.dtype)
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state), tok, mcfg


def load_task(c: ConfigDict):
  """(train problems, test problems)."""
  if c.task == "arithmetic":
    acfg = _wrap(tasks_lib.ArithmeticConfig, ops=tuple(c.arith_ops),
                 digits=tuple(int(d) for d in c.arith_digits), num_train=c.arith_num_train,
                 num_test=c.arith_num_test, seed=c.arith_seed)
    return tasks_lib.arithmetic_splits(acfg)
  if not os.path.exists(c.task):
    raise ValueError(f"config.task={c.task!r} is neither 'arithmetic' nor an existing "
                     ".jsonl/.parquet file")
  rows = tasks_lib.load_tasks(c.task)
  n_test = min(c.arith_num_test, max(1, len(rows) // 10))
  return rows[n_test:], rows[:n_test]


def make_prompt_fn(style: str):
  def chat(tok, problem):
    user = tasks_lib.format_prompt(problem)
    if not getattr(tok, "chat_template", None):
      return tok.encode(f"{user}\n<think>\n", add_special_tokens=False)
    text = tok.apply_chat_template([{"role": "system", "content": THINK_SYSTEM},
                                    {"role": "user", "content": user}])
    return tok.encode(text + "<think>\n", add_special_tokens=False)

  def plain(tok, problem):
    return tok.encode(f"{tasks_lib.format_prompt(problem)}\n<think>\n", add_special_tokens=False)

  def bare(tok, problem):
    return tok.encode(f"{problem}=", add_special_tokens=False)
  return {"chat": chat, "plain": plain, "bare": bare}[style]


def make_reward_fn(c: ConfigDict):
  """(texts, golds) -> (rewards, {status: count}); math-verify behind a worker deadline."""
  from soft_grpo.answer_check import AnswerCheckConfig
  from soft_grpo.rewards import RewardConfig, RewardScorer, count_statuses
  rcfg = _wrap(RewardConfig, check=AnswerCheckConfig(answer_format=c.answer_format),
               num_workers=c.reward_workers, item_deadline_s=float(c.reward_deadline_s))
  scorer = RewardScorer(rcfg)

  def reward_fn(texts, golds):
    r, statuses = scorer.score_batch(texts, golds)
    return r, count_statuses(statuses)
  reward_fn.close = scorer.close
  return reward_fn


def grpo_config(c: ConfigDict, tokenizer) -> GRPOConfig:
  te = tuple(int(i) for i in c.think_end_ids) or think_end_ids(tokenizer, c.think_end)
  eos = tuple(getattr(tokenizer, "eos_ids", ()) or ())
  pad = getattr(tokenizer, "pad_id", None)
  rollout = _wrap(RolloutConfig, mode=c.mode, max_new_tokens=c.max_new_tokens,
                  think_budget=c.think_budget, top_k=c.top_k, top_p=float(c.top_p),
                  temperature=float(c.temperature), tau=float(c.tau),
                  noise_factor=float(c.noise_factor), dirichlet_alpha=float(c.dirichlet_alpha),
                  gaussian_std=float(c.gaussian_std), answer_top_k=c.answer_top_k,
                  answer_top_p=float(c.answer_top_p), think_end_ids=te,
                  think_end_match=c.think_end_match, eos_ids=eos,
                  pad_id=int(pad if pad is not None else (eos[0] if eos else 0)),
                  cold_stop_entropy=float(c.cold_stop_entropy),
                  cold_stop_steps=c.cold_stop_steps)
  loss = _wrap(LossConfig, clip_ratio_low=float(c.clip_ratio_low),
               clip_ratio_high=float(c.clip_ratio_high), clip_ratio_c=float(c.clip_ratio_c),
               kl_coef=float(c.kl_coef), entropy_coef=float(c.entropy_coef),
               loss_agg=c.loss_agg, loss_agg_micro_rows=c.loss_agg_micro_rows)
  return _wrap(GRPOConfig, rollout=rollout, loss=loss, group_size=c.group_size,
               prompts_per_step=c.prompts_per_step, mini_batch_prompts=c.mini_batch_prompts,
               ppo_epochs=c.ppo_epochs, learning_rate=float(c.learning_rate),
               weight_decay=float(c.weight_decay), grad_clip=float(c.grad_clip),
               max_prompt_len=c.max_prompt_len, micro_batch_rows=c.micro_batch_rows,
               eval_tau=float(c.eval_tau), seed=c.seed)


def make_mesh(c: ConfigDict):
  if c.mesh_fsdp > 1:
    return sharding_lib.make_mesh((c.mesh_data, c.mesh_fsdp), ("data", "fsdp"))
  return sharding_lib.make_mesh((c.mesh_data,), ("data",))


def build(c: ConfigDict):
  """Everything a run needs: (trainer, initial params, test problems, tokenizer, model cfg)."""
  validate_config(c)
  graphdef, params, tok, mcfg = load_model(c)
  train_set, test_set = load_task(c)
  gcfg = grpo_config(c, tok)
  trainer = Trainer(graphdef, gcfg, tok, train_set, make_reward_fn(c), mesh=make_mesh(c),
                    prompt_fn=make_prompt_fn(c.get("prompt", "chat")))
  return trainer, params, test_set, tok, mcfg


# ----------------------------------------------------------------------------- training


def evaluate(trainer: Trainer, params, test_set, n: int, num: int, seed: int) -> dict:
  """Accuracy of n samples on the first `num` test problems (the trainer's rollout mode;
  soft modes at tau = config.eval_tau, see `Trainer.evaluate`)."""
  sub = getattr(trainer, "_eval_trainer", None)
  if sub is None:   # one evaluation trainer per run, so its rollout compiles once
    sub = trainer._eval_trainer = Trainer(
        trainer.graphdef, trainer.cfg, trainer.tokenizer, test_set[:num], trainer.reward_fn,
        mesh=trainer.mesh, prompt_fn=trainer.prompt_fn)
  correct = sub.evaluate(params, list(range(min(num, len(test_set)))), n,
                         jax.random.key(seed + 10_007))
  return {"accuracy": float(correct.mean()), "pass@n": float(correct.max(axis=1).mean())}


def train(c: ConfigDict, workdir: str, *, log_fn=print) -> tuple[TrainState, list[dict]]:
  """Trains (or resumes) in `workdir`; returns the final state and this call's metrics."""
  from common.train.checkpoint import Checkpointer, abstract_like
  from common.train.metrics import MetricsWriter

  trainer, params, test_set, tok, mcfg = build(c)
  os.makedirs(workdir, exist_ok=True)
  state = trainer.place_state(init_state(params, trainer.cfg))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
  # Restore before writing config.json: a layout mismatch raises and must not clobber the
  # previous run's config.
  restored = ckpt.restore_latest(abstract_like(state))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  resume_step = None
  if restored is not None:
    resume_step, state, extras = restored
    expected = resume_step * c.prompts_per_step
    if int(extras.get("data_position", expected)) != expected:
      raise ValueError(f"checkpoint {resume_step}: data_position {extras['data_position']} "
                       f"!= step * prompts_per_step = {expected}")
    log_fn(f"resumed from step {resume_step} (data position {expected})")
  writer = MetricsWriter(workdir, resume_step=resume_step)
  history = []
  start = int(state.step)
  bar = None
  if c.progress:
    from tqdm import tqdm
    bar = tqdm(total=c.num_steps, initial=start, desc=f"{c.mode}", dynamic_ncols=True)
  try:
    for _ in range(start, c.num_steps):
      state, m = trainer.train_step(state)
      step = int(state.step)
      if c.eval_every and step % c.eval_every == 0:
        m.update({f"eval_{k}": v for k, v in evaluate(
            trainer, state.params, test_set, c.eval_n, c.eval_problems, c.seed).items()})
      writer.write(step, "train", m)
      history.append({"step": step, **m})
      if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['response_length']:.0f}",
                        kl=f"{m['kl']:.1e}")
      if step % c.checkpoint_every == 0 or step == c.num_steps:
        ckpt.save(step, state, extras={"data_position": step * c.prompts_per_step})
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
    getattr(trainer.reward_fn, "close", lambda: None)()
  if c.export:
    export_policy(trainer, state.params, tok, mcfg, os.path.join(workdir, "export"))
  return state, history


def export_policy(trainer: Trainer, params, tokenizer, mcfg, out_dir: str) -> str:
  from flax import nnx
  from common.weights.export import export_hf
  model = nnx.merge(trainer.graphdef, jax.device_get(params))
  tok = tokenizer if not isinstance(tokenizer, ByteTokenizer) else None
  return export_hf(model, tok, mcfg, out_dir)


# ----------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags():
  """Flags are defined only when run as a script, so the modules import side-effect free."""
  config_flags.DEFINE_config_file("config", "experiments/configs/soft_grpo.py:cpu_small",
                                  "SofT-GRPO config file and preset.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tb).")


def main(argv):
  del argv
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required")
  logging.basicConfig(level=logging.WARNING)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax logs every save at INFO
  try:
    _, history = train(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
  if history:
    print(json.dumps({k: v for k, v in history[-1].items() if not isinstance(v, dict)}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
