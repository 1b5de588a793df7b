"""SofT-GRPO / GRPO trainer: a pure-functional core (state -> state) and a thin host loop.

Per step (paper Alg. 1; official verl `ray_trainer.fit` + `dp_actor`):
  1. rollout: `prompts_per_step` prompts x `group_size` samples (`soft_grpo.rollout`);
  2. rewards on the host (math-verify with a timeout, or any `reward_fn`);
  3. group-relative advantages (`soft_grpo.advantages.group_advantages`);
  4. old and reference log-probs recomputed with the same scorer (`score_actions`);
  5. `prompts_per_step / mini_batch_prompts` AdamW updates of the GRPO loss.

Scoring rebuilds the inputs from the stored (ids, y') with the rollout's own w, detached
(no gradient through the mixture: official dp_actor.py feeds `topk_embs.detach()`); the logits
at position t score the action stored at t+1. Mode "discrete" is plain GRPO: inputs are token
ids (so, as in verl, the input embedding also gets gradient) and every action is a token.

`rollout`, `score` and `update` are `jax.jit`s with explicit in/out shardings over a Mesh:
batch over the data axis, parameters by `common.sharding` rules (replicated, or FSDP when the
mesh has an "fsdp" axis).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from common import sharding as sharding_lib
from common.sampler import left_pad
from soft_grpo import logprob as logprob_lib
from soft_grpo import loss as loss_lib
from soft_grpo.advantages import group_advantages
from soft_grpo.rollout import RolloutConfig, RolloutOutput, rebuild_inputs, response_texts
from soft_grpo.rollout import rollout as rollout_fn

# Official prompt suffix (SofT-GRPO / DeepScaleR data).
PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
THINK_SYSTEM = ("You are a helpful assistant. First think about the problem inside "
                "<think> </think> tags, then give the final answer within \\boxed{}.")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  rollout: RolloutConfig
  loss: loss_lib.LossConfig = loss_lib.LossConfig()
  group_size: int = 8
  prompts_per_step: int = 64
  mini_batch_prompts: int = 32        # 64 / 32 = two updates per step
  ppo_epochs: int = 1
  learning_rate: float = 1e-6         # constant
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_prompt_len: int = 256           # prompts are left-padded to this width (one compile)
  micro_batch_rows: int = 0           # 0 = whole mini-batch; else grad accumulation / chunks
  eval_tau: float = 0.5               # Gumbel-softmax tau of `Trainer.evaluate` (official inference)
  seed: int = 0

  def __post_init__(self):
    def bad(field, allowed, value):
      raise ValueError(f"config.{field} must be {allowed}, got {value!r}")
    if self.group_size < 2:
      bad("group_size", ">= 2 (the group std needs two samples)", self.group_size)
    if self.prompts_per_step < 1:
      bad("prompts_per_step", ">= 1", self.prompts_per_step)
    if self.mini_batch_prompts < 1 or self.prompts_per_step % self.mini_batch_prompts:
      bad("mini_batch_prompts", f"a divisor of prompts_per_step={self.prompts_per_step}",
          self.mini_batch_prompts)
    if self.ppo_epochs < 1:
      bad("ppo_epochs", ">= 1", self.ppo_epochs)
    if self.learning_rate < 0:
      bad("learning_rate", ">= 0", self.learning_rate)
    if self.weight_decay < 0:
      bad("weight_decay", ">= 0", self.weight_decay)
    if self.grad_clip <= 0:
      bad("grad_clip", "> 0", self.grad_clip)
    if self.max_prompt_len < 1:
      bad("max_prompt_len", ">= 1", self.max_prompt_len)
    if not self.eval_tau > 0:
      bad("eval_tau", "> 0", self.eval_tau)
    if self.loss.loss_agg == "token_mean_per_micro" and (
        self.rows_per_update % self.loss.loss_agg_micro_rows):
      bad("loss_agg_micro_rows", f"a divisor of mini_batch_prompts * group_size = "
          f"{self.rows_per_update}", self.loss.loss_agg_micro_rows)
    if self.micro_batch_rows < 0 or (self.micro_batch_rows and (
        self.rows_per_update % self.micro_batch_rows)):
      bad("micro_batch_rows", f"0 or a divisor of mini_batch_prompts * group_size = "
          f"{self.rows_per_update}", self.micro_batch_rows)

  @property
  def rows_per_step(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def rows_per_update(self) -> int:
    return self.mini_batch_prompts * self.group_size

  @property
  def num_micro_batches(self) -> int:
    return self.rows_per_update // self.micro_batch_rows if self.micro_batch_rows else 1

  @property
  def num_score_chunks(self) -> int:
    return self.rows_per_step // self.micro_batch_rows if self.micro_batch_rows else 1


@flax.struct.dataclass
class TrainState:
  params: Any        # pure dict of the policy's nnx state
  opt_state: Any
  ref_params: Any    # frozen reference policy (KL anchor)
  rng: jax.Array     # raw uint32 key data (checkpointable)
  step: jax.Array    # int32 []


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
  """Grad-norm clip then AdamW, constant LR (official verl actor defaults for SofT-GRPO)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay))


def init_state(params, cfg: GRPOConfig) -> TrainState:
  params = jax.tree.map(jnp.asarray, params)
  ref = jax.tree.map(jnp.copy, params)
  return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), ref_params=ref,
                    rng=jax.random.key_data(jax.random.key(cfg.seed)),
                    step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- pure functions


def score_actions(graphdef, params, out: RolloutOutput, rcfg: RolloutConfig):
  """log pi(action_n | prefix) for every response position n -> [B, N] float32."""
  model = nnx.merge(graphdef, params)
  p_len = out.prompt_BxP.shape[1]
  n = out.tokens_BxN.shape[1]
  if rcfg.mode == "discrete":
    tokens = jnp.concatenate([out.prompt_BxP, out.tokens_BxN], axis=1)[:, :-1]
    logits, _ = model(tokens, start_B=out.start_B)
  else:
    embeds = rebuild_inputs(model.embedding_table_VxD, out, mode=rcfg.mode, tau=rcfg.tau)
    logits, _ = model(embeds_BxTxD=embeds[:, :-1], start_B=out.start_B)
  # Logits at slot t score the action stored at t + 1 (official torch.roll(shifts=-1)).
  logits_BxNxV = logits[:, p_len - 1:p_len - 1 + n]
  kwargs = {}
  if rcfg.mode == "soft_dirichlet":
    kwargs["dirichlet_alpha"] = rcfg.dirichlet_alpha
  elif rcfg.mode == "soft_gaussian":
    kwargs["gaussian_std"] = rcfg.gaussian_std
  return logprob_lib.action_logprobs(logits_BxNxV, out.ids_BxNxK, out.y_BxNxK,
                                     temperature=rcfg.temperature, mode=rcfg.mode, **kwargs)


def grpo_objective(params, graphdef, batch, cfg: GRPOConfig):
  out: RolloutOutput = batch["rollout"]
  logp = score_actions(graphdef, params, out, cfg.rollout)
  mask = out.action_mask_BxN
  adv = batch["advantages_B"][:, None] * mask.astype(jnp.float32)
  loss, metrics = loss_lib.grpo_loss(logp, batch["old_logp_BxN"], batch["ref_logp_BxN"], adv,
                                     mask, config=cfg.loss,
                                     weights_BxT=batch.get("loss_weights_BxN"))
  return loss, metrics


def split_micro(x, m: int):
  """[R, ...] -> [m, R/m, ...] with micro-batch j = rows j, j+m, ...: every micro-batch
  keeps rows on every data shard, so a batch-sharded array stays evenly sharded."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def merge_micro(x):
  """Inverse of `split_micro`."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def score_in_chunks(graphdef, params, out: RolloutOutput, rcfg: RolloutConfig, chunks: int):
  """`score_actions` over `chunks` sequential row chunks (bounds the [B, T, V] logits)."""
  if chunks <= 1:
    return score_actions(graphdef, params, out, rcfg)
  micro = jax.tree.map(lambda x: split_micro(x, chunks), out)
  return merge_micro(jax.lax.map(lambda o: score_actions(graphdef, params, o, rcfg), micro))


def update_step(state: TrainState, batch, *, graphdef, cfg: GRPOConfig):
  """One AdamW step on one mini-batch: state -> (state, metrics).

  The token weights of `cfg.loss.loss_agg` are computed on the whole mini-batch, so with
  `cfg.micro_batch_rows` the gradients (and metrics) summed over the memory micro-batches (a
  `lax.scan`) are those of the whole mini-batch's loss.
  """
  grad_fn = jax.grad(grpo_objective, has_aux=True)
  batch = dict(batch, loss_weights_BxN=loss_lib.loss_token_weights(
      batch["rollout"].action_mask_BxN, loss_agg=cfg.loss.loss_agg,
      micro_rows=cfg.loss.loss_agg_micro_rows))
  m = cfg.num_micro_batches
  if m <= 1:
    grads, metrics = grad_fn(state.params, graphdef, batch, cfg)
  else:
    micro = jax.tree.map(lambda x: split_micro(x, m), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(state.params, graphdef, first, cfg))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, grad_fn(state.params, graphdef, mb, cfg)), None
    (grads, metrics), _ = jax.lax.scan(body, init, micro)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return state.replace(params=params, opt_state=opt_state, step=state.step), metrics


# ----------------------------------------------------------------------------- host side


class ByteTokenizer:
  """Byte-level tokenizer for tiny random test models: id = byte + 3; 0 pad, 1 bos, 2 eos."""
  pad_id, bos_id, eos_id = 0, 1, 2
  eos_ids = (2,)
  chat_template = None

  @property
  def vocab_size(self):
    return 259

  def encode(self, text, add_special_tokens=False):
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids, skip_special_tokens=False):
    return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", "replace")


def think_end_ids(tokenizer, think_end: str = "</think>") -> tuple[int, ...]:
  """All token pieces of the think-end string; detection uses the last one."""
  ids = tuple(int(i) for i in tokenizer.encode(think_end, add_special_tokens=False))
  if not ids:
    raise ValueError(f"think_end string {think_end!r} encodes to no tokens")
  return ids


def build_prompt(tokenizer, problem: str) -> list[int]:
  """Chat prompt asking for <think>...</think> then \\boxed{}; the assistant turn is opened
  with "<think>\\n" so every rollout starts in the thinking phase."""
  user = f"{problem} {PROMPT_SUFFIX}"
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": user}],
        add_generation_prompt=True)
    return tokenizer.encode(text + "<think>\n", add_special_tokens=False)
  return tokenizer.encode(f"{user}\n<think>\n", add_special_tokens=False)


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


def _tree_shardings(tree, mesh, spec_fn):
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_fn(x)), tree)


class Trainer:
  """Holds the jitted functions, the task and the tokenizer; `train_step(state, step)`."""

  def __init__(self, graphdef, cfg: GRPOConfig, tokenizer, problems: Sequence[dict],
               reward_fn: Callable, *, mesh=None, prompt_fn: Callable = None):
    if not problems:
      raise ValueError("Trainer: problems is empty")
    self.graphdef, self.cfg, self.tokenizer = graphdef, cfg, tokenizer
    self.problems = list(problems)
    self.reward_fn = reward_fn      # (texts, golds) -> (rewards [B], info dict)
    self.prompt_fn = prompt_fn or build_prompt   # (tokenizer, problem) -> ids
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    axes = sharding_lib.batch_axes(self.mesh)
    dp = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
    if cfg.rows_per_update % dp:
      raise ValueError(f"config.mini_batch_prompts * group_size = {cfg.rows_per_update} must "
                       f"be divisible by the data-parallel size {dp}")
    self._prompt_cache: dict[int, list[int]] = {}
    self._jits = {}

  # --- shardings
  def batch_sharding(self, tree):
    return _tree_shardings(tree, self.mesh, lambda x: sharding_lib.batch_spec(self.mesh, x.ndim))

  def state_sharding(self, state: TrainState):
    params = sharding_lib.param_shardings(state.params, self.mesh)
    return TrainState(params=params,
                      opt_state=sharding_lib.param_shardings(state.opt_state, self.mesh),
                      ref_params=sharding_lib.param_shardings(state.ref_params, self.mesh),
                      rng=sharding_lib.replicated(self.mesh),
                      step=sharding_lib.replicated(self.mesh))

  def place_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.state_sharding(state))

  # --- jitted pieces (built on first use, with explicit in/out shardings)
  def _rollout_jit(self, params, prompt_BxP, rcfg: RolloutConfig):
    if ("rollout", rcfg) not in self._jits:
      p_sh = sharding_lib.param_shardings(params, self.mesh)
      b_sh = lambda nd: NamedSharding(self.mesh, sharding_lib.batch_spec(self.mesh, nd))
      out_sh = RolloutOutput(
          prompt_BxP=b_sh(2), start_B=b_sh(1), tokens_BxN=b_sh(2), ids_BxNxK=b_sh(3),
          y_BxNxK=b_sh(3), soft_BxN=b_sh(2), segment_BxN=b_sh(2), think_len_B=b_sh(1),
          answer_len_B=b_sh(1), length_B=b_sh(1),
          embeds_BxNxD=b_sh(3) if rcfg.record_embeds else None)
      self._jits["rollout", rcfg] = jax.jit(
          lambda p, x, s, k: rollout_fn(self.graphdef, p, x, s, rcfg, k),
          in_shardings=(p_sh, b_sh(2), b_sh(1), sharding_lib.replicated(self.mesh)),
          out_shardings=out_sh)
    return self._jits["rollout", rcfg]

  def _score_jit(self, params, out):
    if "score" not in self._jits:
      p_sh = sharding_lib.param_shardings(params, self.mesh)
      self._jits["score"] = jax.jit(
          lambda p, o: score_in_chunks(self.graphdef, p, o, self.cfg.rollout,
                                       self.cfg.num_score_chunks),
          in_shardings=(p_sh, self.batch_sharding(out)),
          out_shardings=NamedSharding(self.mesh, sharding_lib.batch_spec(self.mesh, 2)))
    return self._jits["score"]

  def _update_jit(self, state, batch):
    if "update" not in self._jits:
      st_sh = self.state_sharding(state)
      self._jits["update"] = jax.jit(
          functools.partial(update_step, graphdef=self.graphdef, cfg=self.cfg),
          in_shardings=(st_sh, self.batch_sharding(batch)),
          out_shardings=(st_sh, sharding_lib.replicated(self.mesh)),
          donate_argnums=(0,))
    return self._jits["update"]

  # --- host helpers
  def prompt_ids(self, idx: int) -> list[int]:
    if idx not in self._prompt_cache:
      ids = self.prompt_fn(self.tokenizer, self.problems[idx]["problem"])
      if len(ids) > self.cfg.max_prompt_len:
        raise ValueError(f"problem {idx}: prompt has {len(ids)} tokens > config.max_prompt_len="
                         f"{self.cfg.max_prompt_len}")
      self._prompt_cache[idx] = ids
    return self._prompt_cache[idx]

  def prompt_batch(self, indices: Sequence[int], group_size: int):
    rows = [self.prompt_ids(i) for i in indices for _ in range(group_size)]
    tokens, start = left_pad(rows, self.cfg.rollout.pad_id, multiple=self.cfg.max_prompt_len)
    return tokens, start

  def generate(self, params, indices: Sequence[int], group_size: int, key, *,
               rcfg: RolloutConfig | None = None):
    """Rollouts for `indices` x `group_size` (prompt-major); returns (out, full, answers).
    `rcfg` defaults to the training rollout config."""
    rcfg = rcfg or self.cfg.rollout
    tokens, start = self.prompt_batch(indices, group_size)
    tokens, start = sharding_lib.shard_batch((jnp.asarray(tokens), jnp.asarray(start)),
                                             self.mesh)
    out = self._rollout_jit(params, tokens, rcfg)(params, tokens, start, key)
    full, answers = response_texts(self.tokenizer, out)
    return out, full, answers

  def rewards(self, indices, texts, group_size):
    golds = [self.problems[i]["answer"] for i in indices for _ in range(group_size)]
    r, info = self.reward_fn(texts, golds)
    return np.asarray(r, np.float32), info

  # --- one training step
  def train_step(self, state: TrainState):
    cfg = self.cfg
    step = int(state.step)
    t0 = time.perf_counter()
    idx = problems_for_step(len(self.problems), step, cfg.prompts_per_step, cfg.seed)
    rng, k_roll = jax.random.split(jax.random.wrap_key_data(state.rng))
    out, full, answers = self.generate(state.params, idx, cfg.group_size, k_roll)
    jax.block_until_ready(out)
    t_roll = time.perf_counter() - t0
    rewards, info = self.rewards(idx, full, cfg.group_size)
    adv = np.asarray(group_advantages(rewards, cfg.group_size))
    old_logp = self._score_jit(state.params, out)(state.params, out)
    ref_logp = self._score_jit(state.ref_params, out)(state.ref_params, out)
    state = state.replace(rng=jax.random.key_data(rng))
    rows = cfg.rows_per_update
    upd = []
    for _ in range(cfg.ppo_epochs):
      for s in range(0, cfg.rows_per_step, rows):
        sl = lambda x: x[s:s + rows]
        batch = {"rollout": jax.tree.map(sl, out), "advantages_B": jnp.asarray(adv[s:s + rows]),
                 "old_logp_BxN": sl(old_logp), "ref_logp_BxN": sl(ref_logp)}
        batch = sharding_lib.shard_batch(batch, self.mesh)
        state, m = self._update_jit(state, batch)(state, batch)
        upd.append(m)
    state = state.replace(step=state.step + 1)
    upd = jax.device_get(upd)
    dt = time.perf_counter() - t0
    length = np.asarray(out.length_B)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1.0).mean()),
        "response_length": float(length.mean()),
        "think_length": float(np.asarray(out.think_len_B).mean()),
        "answer_length": float(np.asarray(out.answer_len_B).mean()),
        "clip_fraction": float(np.mean([m["clip_fraction"] for m in upd])),
        "kl": float(np.mean([m["kl"] for m in upd])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in upd])),
        "pg_loss": float(np.mean([m["pg_loss"] for m in upd])),
        "loss": float(np.mean([m["loss"] for m in upd])),
        "tokens_per_s": float(length.sum() / dt),
        "rollout_tokens_per_s": float(length.sum() / t_roll),
        "step_time_s": dt,
        "data_position": (step + 1) * cfg.prompts_per_step,
    }
    if isinstance(info, dict):
      metrics.update({f"reward_{k}": v for k, v in info.items()
                      if isinstance(v, (int, float, np.integer, np.floating))})
    return state, metrics

  # --- evaluation (no update)
  def evaluate(self, params, indices: Sequence[int], n: int, key, *, rows_per_call: int = 0):
    """Correctness [len(indices), n] of n samples per problem (prompt-major batches).

    Soft modes sample with tau = `cfg.eval_tau` (official inference 0.5), not the training tau.
    """
    rcfg = self.cfg.rollout
    if rcfg.soft:
      rcfg = dataclasses.replace(rcfg, tau=self.cfg.eval_tau)
    per_call = max(1, (rows_per_call or self.cfg.rows_per_step) // n)
    correct = []
    for s in range(0, len(indices), per_call):
      chunk = list(indices[s:s + per_call])
      pad = per_call - len(chunk)      # keep one compiled shape
      key, sub = jax.random.split(key)
      _, full, _ = self.generate(params, chunk + chunk[:1] * pad, n, sub, rcfg=rcfg)
      r, _ = self.rewards(chunk + chunk[:1] * pad, full, n)
      correct.append(r.reshape(-1, n)[:len(chunk)])
    return np.concatenate(correct, axis=0)
