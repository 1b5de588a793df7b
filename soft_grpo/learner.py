"""The SofT-GRPO / GRPO loop: data order, prompts, rollouts, rewards, checkpoints, metrics,
evaluation. The math it feeds is in `soft_grpo.algorithm` (pure functions).

Per step (paper Alg. 1; official verl `ray_trainer.fit` + `dp_actor`):
  1. rollout: `prompts_per_step` prompts x `group_size` samples (`soft_grpo.rollout`);
  2. rewards on the host (math-verify behind worker deadlines, or any `reward_fn`);
  3. group-relative advantages (`soft_grpo.advantages.group_advantages`);
  4. old and reference log-probs recomputed with the same scorer (`algorithm.score_actions`);
  5. `prompts_per_step / mini_batch_prompts` AdamW updates of the GRPO loss.

`train(config, workdir)` and `evaluate(config, ...)` are the library entry points; the
workdir resumes: orbax checkpoints of (params, optimizer state, reference params, rng, step)
plus the data position in <workdir>/checkpoints (`run.checkpoint_params_only`: params only,
a model that refuses to resume), metrics in <workdir>/metrics.jsonl and
TensorBoard events in <workdir>/tb. `rollout`, `score` and `update` are `jax.jit`s with
explicit in/out shardings over a Mesh: batch over the data axis, parameters by
`common.sharding` rules (replicated, or FSDP when the mesh has an "fsdp" axis).

Multi-process (`jax.distributed`, started by experiments.cli): the global batch is prompt-major
and split by prompt, so process p builds the prompts of its block of prompts, decodes and
scores the rewards of its rows only and computes the advantages of whole groups; `put_batch`
assembles the global arrays and host metrics are gathered across processes. Process 0 holds
the workdir lock and writes config, metrics and exports; all processes join the checkpoints.
The data position is a function of the step, so a checkpoint resumes on any process count.

Safety (issue 12): `algorithm.update_step` keeps the old state on a bad update
(common.train.guard); `run.nonfinite` skips or stops, and no checkpoint is written right after a
bad step. A resumed run must keep the settings that change the math (`check_config_on_resume`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import ConfigDict
from tqdm import tqdm

from common import load_pretrained
from common import sharding as sharding_lib
from common.config import tiny_config
from common.model import Decoder
from common.sampler import left_pad
from common.tokenizer import ByteTokenizer
from common.train import guard as guard_lib
from common.train import workdir as workdir_lib
from common.train.checkpoint import Checkpointer, abstract_like
from common.train.metrics import MetricsWriter, NoWriter
from common.train.train_state import TrainState
from common.weights.export import export_hf
from soft_grpo import algorithm
from soft_grpo import rewards as rewards_lib
from soft_grpo import tasks as tasks_lib
from soft_grpo.advantages import group_advantages
from soft_grpo.config import Config, ModelSpec
from soft_grpo.prompts import build_prompt
from soft_grpo.rollout import RolloutConfig, RolloutOutput, response_texts
from soft_grpo.rollout import rollout as rollout_fn

# Seed offset of the periodic evaluation's samples (apart from the training keys).
EVAL_SEED_OFFSET = 10_007


def load_model(spec: ModelSpec, seed: int):
  """(graphdef, params pure dict, tokenizer, model config) of the `model` section."""
  if spec.name == "tiny":
    tok = ByteTokenizer()
    mcfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512,
                       eos_token_id=tok.eos_id)
    model = Decoder(mcfg, rngs=nnx.Rngs(seed))
  else:
    model, tok, mcfg = load_pretrained(spec.name, spec.dtype)
  graphdef, state = nnx.split(model)
  if spec.remat != mcfg.remat:   # same parameters; only the update's memory plan changes
    mcfg = mcfg.replace(remat=spec.remat)
    graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(mcfg, rngs=nnx.Rngs(0))))[0]
  return graphdef, nnx.to_pure_dict(state), tok, mcfg


def problems_for_step(num_problems: int, step: int, per_step: int, seed: int) -> list[int]:
  """Problem indices of a step: epochs of seeded permutations, so the data position is a
  pure function of (step, seed) and a resumed run continues identically."""
  out = []
  pos = step * per_step
  while len(out) < per_step:
    epoch, off = divmod(pos, num_problems)
    perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
    take = min(per_step - len(out), num_problems - off)
    out.extend(int(i) for i in perm[off:off + take])
    pos += take
  return out


def _mean(metrics: list[dict], key: str) -> float:
  return float(np.mean([m[key] for m in metrics]))


# --- multi-process helpers. Each process builds, decodes and scores the rows of ITS prompts
# (a contiguous block of the prompt-major global batch, so every group stays on one process);
# `put_batch` assembles the global arrays; host metrics are gathered across processes.

def process_block(items: Sequence, *, what: str = "prompts") -> list:
  """This process's contiguous share of a global list (all of it with one process)."""
  n, p = jax.process_count(), jax.process_index()
  if len(items) % n:
    raise ValueError(f"{what}: {len(items)} is not divisible by the {n} processes; allowed: a "
                     f"multiple of the process count")
  k = len(items) // n
  return list(items[p * k:(p + 1) * k])


def local_rows(x) -> np.ndarray:
  """The rows (axis 0) of a batch-sharded array that live on this process, in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for sh in x.addressable_shards:
    shards.setdefault(sh.index[0].start or 0, sh.data)   # replicas over fsdp/tensor: once
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def gather_rows(x) -> np.ndarray:
  """The global rows of a per-process host array (process order) or of a global array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def sum_over_processes(counts: dict) -> dict:
  """{name: number} summed over processes (same keys everywhere: the reward statuses)."""
  if jax.process_count() == 1 or not counts:
    return counts
  keys = sorted(counts)
  total = gather_rows(np.asarray([[counts[k] for k in keys]], np.float64)).sum(axis=0)
  return {k: (int(v) if isinstance(counts[k], (int, np.integer)) else float(v))
          for k, v in zip(keys, total)}


class Learner:
  """Owns the jitted algorithm, the training problems, the tokenizer and the reward function.

  `train_step(state) -> (state, metrics)`; `evaluate(params, problems, n, key)`.
  `reward_fn(texts, golds) -> (rewards [B], {name: number})`.
  """

  def __init__(self, graphdef, cfg: Config, tokenizer, problems: Sequence[dict],
               reward_fn: Callable, *, mesh=None):
    if not problems:
      raise ValueError("task: the training split is empty; allowed: at least one problem")
    self.graphdef, self.cfg, self.tokenizer = graphdef, cfg, tokenizer
    self.problems = list(problems)
    self.reward_fn = reward_fn
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    dp = sharding_lib.data_parallel_size(self.mesh)
    if cfg.grpo.rows_per_update % dp:
      raise ValueError(f"grpo.mini_batch_prompts: mini_batch_prompts * group_size = "
                       f"{cfg.grpo.rows_per_update} is not divisible by the data-parallel "
                       f"size {dp}; allowed: a multiple of {dp} rows per update")
    if cfg.grpo.prompts_per_step % jax.process_count():
      raise ValueError(f"grpo.prompts_per_step: {cfg.grpo.prompts_per_step} is not divisible "
                       f"by the {jax.process_count()} processes (each builds and scores the "
                       "groups of its own prompts); allowed: a multiple of the process count")
    self._prompt_cache: dict[str, list[int]] = {}
    self._jits: dict[str, Callable] = {}
    # Rows of a step are prompt-major groups (`generate`), and every batch the learner scores
    # or updates is a run of whole groups: G consecutive rows share a prompt.
    self.rows_per_prompt = cfg.grpo.group_size if cfg.grpo.share_prompt_prefix else 1

  # --- shardings
  def _batch_sharding(self, ndim: int) -> NamedSharding:
    return sharding_lib.batch_sharding(self.mesh, ndim)

  def state_sharding(self, state: TrainState):
    """Parameters, optimizer state and reference by the FSDP rules; scalars replicated."""
    p = lambda tree: sharding_lib.param_shardings(tree, self.mesh)
    rep = sharding_lib.replicated(self.mesh)
    return state.replace(params=p(state.params), opt_state=p(state.opt_state),
                         ref_params=p(state.ref_params), model_rest=p(state.model_rest),
                         rng=rep, step=rep, loss_ema=rep, num_spikes=rep, num_nonfinite=rep)

  def place_state(self, state: TrainState) -> TrainState:
    """Host values (the same on every process) -> global arrays; each process fills its own
    shards (no cross-process equality check, which a NaN loss EMA would fail)."""
    def put(x, sh):
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
    return jax.tree.map(put, state, self.state_sharding(state))

  def replicated(self, x):
    """A host value (the same on every process) as a replicated global array."""
    return jax.make_array_from_process_local_data(sharding_lib.replicated(self.mesh),
                                                  np.asarray(x))

  def init_state(self, params) -> TrainState:
    return self.place_state(algorithm.init_state(params, self.cfg))

  # --- jitted pieces (built on first use, with explicit in/out shardings)
  def _rollout_jit(self, params, rcfg: RolloutConfig, group_size: int):
    g = group_size if self.rows_per_prompt > 1 else 1
    if ("rollout", rcfg, g) not in self._jits:
      b = self._batch_sharding
      out_sh = RolloutOutput(
          prompt_BxP=b(2), start_B=b(1), tokens_BxN=b(2), ids_BxNxK=b(3), y_BxNxK=b(3),
          soft_BxN=b(2), segment_BxN=b(2), think_len_B=b(1), answer_len_B=b(1),
          length_B=b(1), embeds_BxNxD=b(3) if rcfg.record_embeds else None)
      self._jits["rollout", rcfg, g] = jax.jit(
          lambda p, x, s, k: rollout_fn(self.graphdef, p, x, s, rcfg, k, rows_per_prompt=g),
          in_shardings=(sharding_lib.param_shardings(params, self.mesh), b(2), b(1),
                        sharding_lib.replicated(self.mesh)),
          out_shardings=out_sh)
    return self._jits["rollout", rcfg, g]

  def _score_jit(self, params, out):
    if "score" not in self._jits:
      self._jits["score"] = jax.jit(
          lambda p, o: algorithm.score_in_chunks(self.graphdef, p, o, self.cfg.rollout,
                                                 self.cfg.grpo.num_score_chunks,
                                                 rows_per_prompt=self.rows_per_prompt),
          in_shardings=(sharding_lib.param_shardings(params, self.mesh),
                        jax.tree.map(lambda x: self._batch_sharding(x.ndim), out)),
          out_shardings=self._batch_sharding(2))
    return self._jits["score"]

  def _score_rows_from_jit(self, params, out, first_row: int):
    """Log-probs of rows [first_row:] only, as a full [B, N] array whose first rows are
    zeros (placeholders that the caller never reads)."""
    key = ("score_from", first_row)
    if key not in self._jits:
      g = self.cfg.grpo
      chunks = max(1, g.num_score_chunks * (g.rows_per_step - first_row) // g.rows_per_step)

      def score_rest(p, o):
        rest = jax.tree.map(lambda x: x[first_row:], o)
        # first_row is a multiple of the group size: `rest` is whole groups too.
        lp = algorithm.score_in_chunks(self.graphdef, p, rest, self.cfg.rollout, chunks,
                                       rows_per_prompt=self.rows_per_prompt)
        return jnp.concatenate([jnp.zeros((first_row,) + lp.shape[1:], lp.dtype), lp])
      self._jits[key] = jax.jit(
          score_rest,
          in_shardings=(sharding_lib.param_shardings(params, self.mesh),
                        jax.tree.map(lambda x: self._batch_sharding(x.ndim), out)),
          out_shardings=self._batch_sharding(2))
    return self._jits[key]

  def _slice_jit(self, batch, start: int, rows: int):
    """Rows [start, start + rows) of every batch array, batch-sharded (global arrays)."""
    if ("slice", start, rows) not in self._jits:
      self._jits["slice", start, rows] = jax.jit(
          lambda b: jax.tree.map(lambda x: x[start:start + rows], b),
          out_shardings=jax.tree.map(lambda x: self._batch_sharding(x.ndim), batch))
    return self._jits["slice", start, rows]

  def _update_jit(self, state, batch):
    key = ("update", tuple(sorted(batch)))   # with / without stored old log-probs
    if key not in self._jits:
      st_sh = self.state_sharding(state)
      self._jits[key] = jax.jit(
          functools.partial(algorithm.update_step, graphdef=self.graphdef, cfg=self.cfg,
                            rows_per_prompt=self.rows_per_prompt),
          in_shardings=(st_sh, jax.tree.map(lambda x: self._batch_sharding(x.ndim), batch)),
          out_shardings=(st_sh, sharding_lib.replicated(self.mesh)),
          donate_argnums=(0,))
    return self._jits[key]

  # --- host helpers
  def prompt_ids(self, problem: str) -> list[int]:
    if problem not in self._prompt_cache:
      ids = build_prompt(self.tokenizer, problem, self.cfg.task.prompt)
      if len(ids) > self.cfg.grpo.max_prompt_len:
        raise ValueError(f"grpo.max_prompt_len: {self.cfg.grpo.max_prompt_len} is shorter "
                         f"than the {len(ids)}-token prompt of problem {problem[:60]!r}; "
                         f"allowed: >= {len(ids)}")
      self._prompt_cache[problem] = ids
    return self._prompt_cache[problem]

  def generate(self, params, problems: Sequence[dict], group_size: int, key, *,
               rcfg: RolloutConfig | None = None):
    """Rollouts for `problems` x `group_size` (prompt-major); returns (out, full, answers).
    `rcfg` defaults to the training rollout config. `problems` is the global list; this
    process builds the prompts of its block (`process_block`) and decodes its rows only:
    `out` is global, `full` / `answers` are this process's rows."""
    rcfg = rcfg or self.cfg.rollout
    rows = [self.prompt_ids(p["problem"]) for p in process_block(problems)
            for _ in range(group_size)]
    # One width for the global batch (every process pads to it): from all the step's prompts.
    width = self.cfg.grpo.prompt_width(max(len(self.prompt_ids(p["problem"]))
                                           for p in problems))
    tokens, start = left_pad(rows, self.cfg.rollout.pad_id, multiple=width)
    tokens, start = sharding_lib.put_batch((tokens, start), self.mesh)
    out = self._rollout_jit(params, rcfg, group_size)(params, tokens, start, key)
    full, answers = response_texts(self.tokenizer, jax.tree.map(local_rows, out))
    return out, full, answers

  def rewards(self, problems: Sequence[dict], texts, group_size: int):
    """Rewards of this process's rows (`texts` from `generate`) of the global `problems`."""
    golds = [p["answer"] for p in process_block(problems) for _ in range(group_size)]
    r, info = self.reward_fn(texts, golds)
    return np.asarray(r, np.float32), info

  # --- one training step
  def old_logp_is_current(self) -> bool:
    """Whether the first update of a step runs at the rollout's parameters (one PPO epoch),
    so that its rows need no separate old-log-prob forward."""
    return self.cfg.grpo.ppo_epochs == 1

  def score(self, state: TrainState, out) -> dict:
    """The log-probs a step's updates need: the reference policy's for every row, and the old
    policy's for the rows that need them. The first update of a one-epoch step runs at the
    rollout's own parameters, so its old log-probs are the current ones (`grpo_objective` uses
    stop_gradient(logp) when the batch has none, as TRL and verl do): only the later
    mini-batches' rows are scored. Returns {"ref_logp_BxN", ["old_logp_BxN"]} (dispatched,
    not waited for)."""
    g = self.cfg.grpo
    rows = g.rows_per_update
    scored = {"ref_logp_BxN": self._score_jit(state.ref_params, out)(state.ref_params, out)}
    if not self.old_logp_is_current():
      scored["old_logp_BxN"] = self._score_jit(state.params, out)(state.params, out)
    elif rows < g.rows_per_step:
      scored["old_logp_BxN"] = self._score_rows_from_jit(state.params, out, rows)(
          state.params, out)
    return scored

  def update(self, state: TrainState, whole: dict) -> tuple[TrainState, list]:
    """The step's AdamW updates over its mini-batches of `whole` (rollout, advantages and the
    `score` outputs) -> (state, per-update metrics on device)."""
    g = self.cfg.grpo
    rows = g.rows_per_update
    upd = []
    for _ in range(g.ppo_epochs):
      for s in range(0, g.rows_per_step, rows):
        batch = self._slice_jit(whole, s, rows)(whole)
        if self.old_logp_is_current() and s == 0:
          batch.pop("old_logp_BxN", None)
        state, m = self._update_jit(state, batch)(state, batch)
        upd.append(m)
    return state, upd

  def train_step(self, state: TrainState):
    cfg, g = self.cfg, self.cfg.grpo
    step = int(state.step)
    t0 = time.perf_counter()
    problems = [self.problems[i] for i in
                problems_for_step(len(self.problems), step, g.prompts_per_step, cfg.seed)]
    # The key is split on the host (the same on every process), then placed replicated.
    rng, k_roll = jax.random.split(jax.random.wrap_key_data(np.asarray(state.rng)))
    out, full, _ = self.generate(state.params, problems, g.group_size, self.replicated(
        jax.random.key_data(k_roll)))
    jax.block_until_ready(out)
    t_roll = time.perf_counter() - t0
    # Scoring is dispatched before the rewards, so the device scores while the host verifies.
    scored = self.score(state, out)
    # Rewards and advantages of this process's rows (whole groups), then one global array.
    rewards_local, info = self.rewards(problems, full, g.group_size)
    adv = sharding_lib.put_batch(np.asarray(group_advantages(rewards_local, g.group_size),
                                            np.float32), self.mesh)
    state = state.replace(rng=self.replicated(jax.random.key_data(rng)))
    state, upd = self.update(state, {"rollout": out, "advantages_B": adv, **scored})
    state = state.replace(step=self.replicated(np.asarray(state.step) + 1))
    upd = jax.device_get(upd)
    bad = [u for u in upd if not bool(u["finite"])]
    dt = time.perf_counter() - t0
    # Metrics over the global batch (gathered across processes; the same on every process).
    rewards = gather_rows(rewards_local)
    info = sum_over_processes(info) if isinstance(info, dict) else info
    length = gather_rows(out.length_B)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1.0).mean()),
        "response_length": float(length.mean()),
        "think_length": float(gather_rows(out.think_len_B).mean()),
        "answer_length": float(gather_rows(out.answer_len_B).mean()),
        **{k: _mean(upd, k) for k in ("clip_fraction", "kl", "grad_norm", "pg_loss", "loss")},
        "tokens_per_s": float(length.sum() / dt),
        "rollout_tokens_per_s": float(length.sum() / t_roll),
        "step_time_s": dt,
        "data_position": (step + 1) * g.prompts_per_step,
        # The guard (algorithm.update_step): updates of this step that were skipped.
        "bad_updates": len(bad), "num_nonfinite": int(state.num_nonfinite),
    }
    if bad:
      first = bad[0]
      metrics["bad"] = {"reason": int(first["bad_reason"]), "loss": float(first["loss"]),
                        "grad_norm": float(first["grad_norm"]),
                        "param_norm": float(first["param_norm"]),
                        "prev_param_norm": float(first["prev_param_norm"])}
    if isinstance(info, dict):
      metrics.update({f"reward_{k}": v for k, v in info.items()
                      if isinstance(v, (int, float, np.integer, np.floating))})
    return state, metrics

  # --- evaluation (no update)
  def evaluate(self, params, problems: Sequence[dict], n: int, key, *,
               rows_per_call: int = 0) -> np.ndarray:
    """Correctness [len(problems), n] of n samples per problem (prompt-major batches).
    Soft modes sample at tau = `run.eval_tau` (official inference 0.5), not the training tau."""
    rcfg = self.cfg.eval_rollout()
    per_call = max(1, (rows_per_call or self.cfg.grpo.rows_per_step) // n)
    procs = jax.process_count()
    per_call = -(-per_call // procs) * procs     # each process generates a block of prompts
    problems = list(problems)
    correct = []
    bar = tqdm(total=len(problems), desc=f"eval {rcfg.mode} (n={n})", unit="problem",
               dynamic_ncols=True, leave=False,
               disable=not self.cfg.run.progress or jax.process_index() != 0)
    for s in range(0, len(problems), per_call):
      chunk = problems[s:s + per_call]
      chunk = chunk + chunk[:1] * (per_call - len(chunk))     # keep one compiled shape
      key, sub = jax.random.split(key)
      _, full, _ = self.generate(params, chunk, n, self.replicated(jax.random.key_data(sub)),
                                 rcfg=rcfg)
      r, _ = self.rewards(chunk, full, n)
      correct.append(gather_rows(r).reshape(-1, n)[:len(problems[s:s + per_call])])
      bar.update(len(correct[-1]))
    bar.close()
    return np.concatenate(correct, axis=0)


class Run(NamedTuple):
  """Everything a run needs, from `build`."""
  cfg: Config
  learner: Learner
  params: Any             # initial policy parameters (pure dict)
  test_set: list[dict]
  tokenizer: Any
  model_config: Any


def as_config(config: Config | ConfigDict | dict) -> Config:
  """A `Config` from a config dict (validated once, here) or a `Config` as it is."""
  return config if isinstance(config, Config) else Config.from_config_dict(config)


def build(config: Config | ConfigDict) -> Run:
  """Model, tokenizer, task splits, reward workers, mesh and the learner of a config.
  The caller closes the reward workers: `run.learner.reward_fn.close()`."""
  cfg = as_config(config)
  graphdef, params, tok, mcfg = load_model(cfg.model, cfg.seed)
  cfg = cfg.for_tokenizer(tok)
  train_set, test_set = tasks_lib.load_splits(cfg.task)
  # Every prompt is measured now, so an over-long row fails at load time naming its line.
  tasks_lib.check_prompt_lengths(
      train_set + test_set, lambda p: len(build_prompt(tok, p, cfg.task.prompt)),
      cfg.grpo.max_prompt_len, source=cfg.task.source)
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  reward_fn = rewards_lib.make_reward_fn(cfg.reward)
  try:
    learner = Learner(graphdef, cfg, tok, train_set, reward_fn, mesh=mesh)
  except BaseException:
    reward_fn.close()
    raise
  return Run(cfg, learner, params, test_set, tok, mcfg)


def _close(learner: Learner) -> None:
  getattr(learner.reward_fn, "close", lambda: None)()


# Settings a resumed run may change freely (recorded in config_history.jsonl): how often to
# log / save / evaluate, the layout on devices, the reward worker count, and num_steps (the LR is
# constant, so the length of the run does not change the steps already taken or to come).
BOOKKEEPING_FIELDS = workdir_lib.BOOKKEEPING_FIELDS | {
    "checkpoint_every", "num_steps", "eval_tau", "data", "fsdp", "tensor", "num_workers",
    "micro_batch_rows", "preset", "checkpoint_params_only"}


def train(config: Config | ConfigDict, workdir: str, *, log_fn: Callable = print,
          allow_config_change: bool = False) -> tuple[TrainState, list[dict]]:
  """Trains (or resumes) in `workdir`; returns the final state and this call's metrics.

  Process 0 holds the workdir lock (a second run on the same workdir is refused) and writes
  config, metrics and exports. A resumed run must keep the settings that change the math
  unless `allow_config_change` (then the change is recorded in config_history.jsonl, with the
  step it took effect; config.json keeps the run's original config).
  """
  is_main = jax.process_index() == 0
  workdir = workdir_lib.prepare_workdir(workdir)
  lock = workdir_lib.WorkdirLock(workdir).acquire() if is_main else None
  try:
    run = build(config)
    try:
      return _train(run, workdir, log_fn, allow_config_change=allow_config_change,
                    is_main=is_main)
    finally:
      _close(run.learner)
  finally:
    if lock is not None:
      lock.release()


def _train(run: Run, workdir: str, log_fn: Callable, *, allow_config_change: bool = False,
           is_main: bool = True) -> tuple[TrainState, list[dict]]:
  cfg, learner, r = run.cfg, run.learner, run.cfg.run
  state = learner.init_state(run.params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=r.keep_checkpoints)
  try:
    _refuse_params_only_resume(ckpt, workdir)
    restored = ckpt.restore_latest(abstract_like(state))
    resume_step = None if restored is None else restored[0]
    # Stored once at the start (never rewritten); a resumed run is compared with it. The
    # top-level `model` / `model_config` are what common.pretrained reads from a run folder.
    mcfg = getattr(run.model_config, "to_dict", None)
    changes = workdir_lib.check_config_on_resume(
        workdir, dataclasses.asdict(cfg), step=resume_step or 0,
        allow_change=allow_config_change, bookkeeping=BOOKKEEPING_FIELDS, write=is_main,
        extra={"model": dataclasses.asdict(cfg.model),
               "model_config": mcfg() if mcfg else None})
    if restored is not None:
      _, state, extras = restored
      expected = resume_step * cfg.grpo.prompts_per_step
      if int(extras.get("data_position", expected)) != expected:
        raise ValueError(f"checkpoint {resume_step}: data_position "
                         f"{extras['data_position']} != step * prompts_per_step = {expected}")
      log_fn(f"resumed from step {resume_step} (data position {expected})")
    if changes:
      log_fn(f"config changed at step {resume_step}: {changes}")
    writer = MetricsWriter(workdir, resume_step=resume_step) if is_main else NoWriter()
    state, history = _loop(run, state, ckpt, writer)
  finally:
    ckpt.close()
  if r.export and is_main:
    export_policy(learner.graphdef, state.params, run.tokenizer, run.model_config,
                  os.path.join(workdir, "export"))
  return state, history


def _refuse_params_only_resume(ckpt: Checkpointer, workdir: str) -> None:
  """A params-only checkpoint (`run.checkpoint_params_only`) has no AdamW moments and no
  reference policy: resuming from it would silently change the math, so it is refused."""
  step = ckpt.latest_step()
  if step is None:
    return
  try:
    params_only = bool(ckpt.restore_extras(step).get("params_only", False))
  except Exception:   # a damaged step: restore_latest reports it (or falls back)
    return
  if params_only:
    raise ValueError(f"run.checkpoint_params_only: checkpoint step {step} in {ckpt.directory} "
                     f"holds parameters only (no optimizer state or reference policy) and "
                     f"cannot resume training; allowed: use the run folder as a model "
                     f"(experiments.generate --model={workdir}) or train in a new workdir")


def _loop(run: Run, state: TrainState, ckpt: Checkpointer,
          writer: MetricsWriter) -> tuple[TrainState, list[dict]]:
  """Steps from `state.step` to `run.num_steps`: metrics, periodic eval, checkpoints."""
  cfg, learner, r = run.cfg, run.learner, run.cfg.run
  eval_set = run.test_set[:r.eval_problems]
  history = []
  guard = guard_lib.StepGuard(r.guard_config())
  pending_save = False
  bar = (tqdm(total=r.num_steps, initial=int(state.step), desc=cfg.rollout.mode,
              dynamic_ncols=True) if r.progress else None)
  try:
    for _ in range(int(state.step), r.num_steps):
      state, m = learner.train_step(state)
      step = int(state.step)
      bad = m.pop("bad", None)
      try:   # a bad step warns (nonfinite="skip") or stops the run, with its metrics logged
        guard.after_step(step, bad is None, 0 if bad is None else bad.pop("reason"),
                         **(bad or {}))
      except guard_lib.BadUpdate:
        writer.write(step, "train", m)
        raise
      if r.eval_every and step % r.eval_every == 0:
        correct = learner.evaluate(state.params, eval_set, r.eval_n,
                                   jax.random.key(cfg.seed + EVAL_SEED_OFFSET))
        m.update(eval_accuracy=float(correct.mean()),
                 **{"eval_pass@n": float(correct.max(axis=1).mean())})
      writer.write(step, "train", m)
      history.append({"step": step, **m})
      if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['response_length']:.0f}",
                        kl=f"{m['kl']:.1e}")
      # Never checkpoint right after a skipped update: save at the next good step instead.
      pending_save |= step % r.checkpoint_every == 0 or step == r.num_steps
      if pending_save and guard.may_checkpoint:
        extras = {"data_position": step * cfg.grpo.prompts_per_step}
        if r.checkpoint_params_only:   # a model, not a resumable state (1/4 of the bytes)
          extras["params_only"] = True
        ckpt.save(step, state.replace(opt_state=None, ref_params=None)
                  if r.checkpoint_params_only else state, extras=extras)
        pending_save = False
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  return state, history


def evaluate(config: Config | ConfigDict, n: int, num_problems: int, *, seed: int = 0,
             rows_per_call: int = 64, params=None) -> np.ndarray:
  """Correctness [num_problems, n] of the config's policy (or `params`) on the first
  `num_problems` test problems, in the config's rollout mode."""
  if n < 1:
    raise ValueError(f"evaluate: n={n}; allowed: >= 1")
  run = build(config)
  try:
    if not 1 <= num_problems <= len(run.test_set):
      raise ValueError(f"evaluate: num_problems={num_problems}; allowed: [1, "
                       f"{len(run.test_set)}] (the test split)")
    return run.learner.evaluate(run.params if params is None else params,
                                run.test_set[:num_problems], n, jax.random.key(seed),
                                rows_per_call=rows_per_call)
  finally:
    _close(run.learner)


def export_policy(graphdef, params, tokenizer, model_config, out_dir: str) -> str:
  """The policy as an HF checkpoint dir (the byte tokenizer of tiny models is not saved)."""
  model = nnx.merge(graphdef, jax.device_get(params))
  tok = tokenizer if not isinstance(tokenizer, ByteTokenizer) else None
  return export_hf(model, tok, model_config, out_dir)
