"""Soft-thinking rollouts (SofT-GRPO, arXiv 2511.06411): pure JAX, jitted, KV cache, while_loop.

One prefill call over the left-padded prompts, then a `lax.while_loop` that decodes every row
through three phases (per row, vectorized over the batch):

  THINK   each step emits a *soft token*: the top-k ids of p~ (top-k, then top-p filtered and
          renormalized softmax(logits / T)) and their perturbed log-weights y'; the next input
          embedding is sum_i w_i E[id_i] with w = softmax(y' / tau) (mode-dependent, see
          `THINK_STEPS`). The recorded token is argmax y' (a Gumbel-max sample in soft_gumbel).
          Mode "discrete" samples an ordinary token here instead (the GRPO baseline).
  FORCE   the think-end string (all of its token pieces) is force-inserted when the thinking
          budget is spent or the optional cold stop fires (entropy of the unfiltered p below
          a threshold for L consecutive steps).
  ANSWER  discrete top-k/top-p sampling until EOS or the length limit.

Thinking ends (THINK -> ANSWER) when the recorded token equals `think_end_ids[-1]`, the last
piece of the tokenizer's encoding of "</think>" (SmolLM2 has no single "</think>" token).
EOS during thinking ends the row.

Storage per response position n (the action taken at n): `ids_BxNxK` and `y_BxNxK`, sorted by
w descending. Discrete positions (answer, forced, every position in mode "discrete") are
one-hot: ids = [tok, 0, ..., 0], y' = [0, -inf, ..., -inf], so that `soft_weights` gives w =
[1, 0, ..., 0] for any tau and the scorer rebuilds exactly the embeddings the rollout fed.
Formulas follow the official code (zz1358m/SofT-GRPO-master, SGLang soft-thinking sampler).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from common.sampler import filter_logits

MODES = ("discrete", "soft", "soft_gumbel", "soft_dirichlet", "soft_gaussian")

# Segment codes of response positions.
SEG_PAD, SEG_THINK, SEG_FORCED, SEG_ANSWER = 0, 1, 2, 3
# Row phases inside the decode loop.
_THINK, _FORCE, _ANSWER, _DONE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  mode: str = "soft_gumbel"
  max_new_tokens: int = 128         # response positions N (think + answer), per row
  think_budget: int = 96            # thinking steps before the think-end string is forced
  top_k: int = 5                    # K: soft-token width (thinking)
  top_p: float = 0.95               # thinking top-p, applied after top-k
  temperature: float = 1.0          # T, for both phases
  tau: float = 0.1                  # Gumbel-softmax temperature (0.1 train, 0.5 inference)
  noise_factor: float = 1.0         # scale of the Gumbel / Gaussian noise
  dirichlet_alpha: float = 1.0      # soft_dirichlet: w ~ Dir(alpha * K * p~)
  answer_top_k: int = 0             # discrete sampling (answer phase; every step in "discrete")
  answer_top_p: float = 1.0
  think_end_ids: tuple[int, ...] = ()   # token pieces of "</think>"; detection on the last one
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  cold_stop_entropy: float = 0.0    # 0 = cold stop off
  cold_stop_steps: int = 0          # L consecutive low-entropy steps

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"RolloutConfig.mode must be one of {MODES}, got {self.mode!r}")
    if self.max_new_tokens < 1:
      raise ValueError(f"RolloutConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.top_k < 1:
      raise ValueError(f"RolloutConfig.top_k must be >= 1, got {self.top_k}")
    if not 0 < self.top_p <= 1 or not 0 < self.answer_top_p <= 1:
      raise ValueError(f"RolloutConfig.top_p/answer_top_p must be in (0, 1], "
                       f"got {self.top_p}/{self.answer_top_p}")
    if self.temperature <= 0 or self.tau <= 0:
      raise ValueError(f"RolloutConfig.temperature/tau must be > 0, "
                       f"got {self.temperature}/{self.tau}")
    if self.noise_factor < 0:
      raise ValueError(f"RolloutConfig.noise_factor must be >= 0, got {self.noise_factor}")
    if self.answer_top_k < 0:
      raise ValueError(f"RolloutConfig.answer_top_k must be >= 0, got {self.answer_top_k}")
    if not self.think_end_ids:
      raise ValueError("RolloutConfig.think_end_ids must name the token ids of '</think>'")
    if not 0 <= self.think_budget <= self.max_new_tokens - len(self.think_end_ids):
      raise ValueError(
          f"RolloutConfig.think_budget must be in [0, max_new_tokens - len(think_end_ids)] = "
          f"[0, {self.max_new_tokens - len(self.think_end_ids)}], got {self.think_budget}")
    if self.cold_stop_entropy < 0 or self.cold_stop_steps < 0:
      raise ValueError("RolloutConfig.cold_stop_entropy/cold_stop_steps must be >= 0")

  @property
  def soft(self) -> bool:
    return self.mode != "discrete"


@flax.struct.dataclass
class RolloutOutput:
  prompt_BxP: jax.Array      # left-padded prompt ids
  start_B: jax.Array         # left-pad width per row (first valid prompt slot)
  tokens_BxN: jax.Array      # recorded token per response position (pad_id after the end)
  ids_BxNxK: jax.Array       # int32 stored top-k ids (one-hot at discrete positions)
  y_BxNxK: jax.Array         # float32 stored y' (-inf on unused slots)
  soft_BxN: jax.Array        # bool: position was a soft token
  segment_BxN: jax.Array     # int32 SEG_* code
  think_len_B: jax.Array     # think positions incl. forced think-end pieces
  answer_len_B: jax.Array
  length_B: jax.Array        # response length = think + answer

  @property
  def think_mask_BxN(self):
    return (self.segment_BxN == SEG_THINK) | (self.segment_BxN == SEG_FORCED)

  @property
  def answer_mask_BxN(self):
    return self.segment_BxN == SEG_ANSWER

  @property
  def response_mask_BxN(self):
    return self.segment_BxN != SEG_PAD

  @property
  def action_mask_BxN(self):
    """Positions the policy chose (forced think-end pieces are not policy actions)."""
    return (self.segment_BxN == SEG_THINK) | (self.segment_BxN == SEG_ANSWER)

  @property
  def prompt_mask_BxP(self):
    p = self.prompt_BxP.shape[1]
    return jnp.arange(p)[None, :] >= self.start_B[:, None]


# ----------------------------------------------------------------------------- soft tokens


def topk_filtered_probs(logits_BxV, *, temperature, top_k, top_p):
  """p~ over the top-k ids: softmax(logits/T), top-k, then top-p, renormalized.

  Returns (ids_BxK, p_BxK), sorted by probability descending; entries removed by top-p get 0.
  """
  p_BxV = jax.nn.softmax(logits_BxV / temperature, axis=-1)
  p_BxK, ids_BxK = jax.lax.top_k(p_BxV, top_k)
  p_BxK = p_BxK / jnp.sum(p_BxK, axis=-1, keepdims=True)
  # Keep the smallest prefix whose mass reaches top_p (the first entry always stays).
  mass_before = jnp.cumsum(p_BxK, axis=-1) - p_BxK
  p_BxK = jnp.where(mass_before < top_p, p_BxK, 0.0)
  p_BxK = p_BxK / jnp.sum(p_BxK, axis=-1, keepdims=True)
  return ids_BxK.astype(jnp.int32), p_BxK


def gumbel_noise(key, shape):
  """Clamped Gumbel(0,1): g = clip(-log(E), -1.5, 3), E ~ Exponential(1) (official code)."""
  e = jax.random.exponential(key, shape, jnp.float32)
  return jnp.clip(-jnp.log(e), -1.5, 3.0)


def _step_soft(key, ids, p, cfg):
  del key
  # No noise: w = p~. Stored y' = log p~ and w = softmax(y') (see soft_weights).
  return ids, jnp.log(p)


def _step_gumbel(key, ids, p, cfg):
  l = jnp.log(p + 1e-6)                                      # official: log(p~ + 1e-6)
  return ids, l + cfg.noise_factor * gumbel_noise(key, p.shape)


def _step_gaussian(key, ids, p, cfg):
  # Ablation: Gaussian instead of Gumbel perturbation of the log-weights.
  l = jnp.log(p + 1e-6)
  return ids, l + cfg.noise_factor * jax.random.normal(key, p.shape, jnp.float32)


def _step_dirichlet(key, ids, p, cfg):
  # Ablation: w ~ Dirichlet(alpha * K * p~) (the "single-threaded reasoners" perturbation);
  # stored as y' = tau * log w so that softmax(y' / tau) = w.
  k = p.shape[-1]
  conc = jnp.maximum(cfg.dirichlet_alpha * k * p, 1e-3)
  w = jax.random.dirichlet(key, conc)
  return ids, cfg.tau * jnp.log(jnp.maximum(w, 1e-30))


# mode -> fn(key, ids_BxK, p~_BxK, cfg) -> (ids_BxK, y_BxK). A variant adds a function here.
THINK_STEPS: dict[str, Callable] = {
    "soft": _step_soft, "soft_gumbel": _step_gumbel, "soft_gaussian": _step_gaussian,
    "soft_dirichlet": _step_dirichlet,
}


def soft_weights(y_BxNxK, *, mode: str, tau: float):
  """w from stored y' (rollout and scorer share this, so the rebuilt input is the fed one)."""
  scale = 1.0 if mode == "soft" else tau
  return jax.nn.softmax(y_BxNxK / scale, axis=-1)


def sort_by_weight(ids_BxK, y_BxK):
  """Sorts (ids, y') by y' descending, i.e. by w descending (softmax is monotone)."""
  order = jnp.argsort(-y_BxK, axis=-1)
  return (jnp.take_along_axis(ids_BxK, order, axis=-1),
          jnp.take_along_axis(y_BxK, order, axis=-1))


def mixture_embeds(embedding_VxD, ids_BxNxK, y_BxNxK, *, mode: str, tau: float):
  """sum_i w_i E[id_i]; exact E[tok] at one-hot (discrete) positions."""
  w = soft_weights(y_BxNxK, mode=mode, tau=tau)
  e = jnp.take(embedding_VxD, ids_BxNxK, axis=0)
  return jnp.einsum("...k,...kd->...d", w.astype(e.dtype), e)


def one_hot_action(tok_B, k: int):
  ids = jnp.zeros((tok_B.shape[0], k), jnp.int32).at[:, 0].set(tok_B)
  y = jnp.full((tok_B.shape[0], k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  return ids, y


def entropy(logits_BxV, temperature):
  lp = jax.nn.log_softmax(logits_BxV / temperature, axis=-1)
  return -jnp.sum(jnp.exp(lp) * lp, axis=-1)


# ----------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnums=(0, 4))
def rollout(graphdef, params, prompt_BxP, start_B, cfg: RolloutConfig, key):
  """Runs one batch of rollouts. `params`: the model state (nnx.State or its pure dict)."""
  model = nnx.merge(graphdef, params)
  b, p_len = prompt_BxP.shape
  n, k = cfg.max_new_tokens, cfg.top_k
  table_VxD = model.embedding_table_VxD
  cache = model.init_cache(b, p_len + n, start_B=start_B)
  logits, cache = model(prompt_BxP, cache=cache)
  eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)
  forced = jnp.asarray(cfg.think_end_ids, jnp.int32)
  think_end = cfg.think_end_ids[-1]
  n_forced = len(cfg.think_end_ids)

  def cond(c):
    return (c["step"] < n) & ~jnp.all(c["phase"] == _DONE)

  def body(c):
    step, phase = c["step"], c["phase"]
    key, k_think, k_ans = jax.random.split(c["key"], 3)
    logits_BxV = c["logits"]
    # Discrete sample (answer phase everywhere; every phase in mode "discrete").
    scaled = logits_BxV / cfg.temperature
    tok_d = jax.random.categorical(
        k_ans, filter_logits(scaled, top_k=cfg.answer_top_k, top_p=cfg.answer_top_p))
    ids_d, y_d = one_hot_action(tok_d.astype(jnp.int32), k)
    if cfg.soft:
      ids_t, p_t = topk_filtered_probs(logits_BxV, temperature=cfg.temperature,
                                       top_k=k, top_p=cfg.top_p)
      ids_t, y_t = sort_by_weight(*THINK_STEPS[cfg.mode](k_think, ids_t, p_t, cfg))
      tok_t = ids_t[:, 0]                                    # argmax y'
    else:
      ids_t, y_t, tok_t = ids_d, y_d, ids_d[:, 0]
    force_tok = forced[jnp.minimum(c["force_idx"], n_forced - 1)]
    ids_f, y_f = one_hot_action(jnp.broadcast_to(force_tok, (b,)), k)
    ids_p, y_p = one_hot_action(jnp.full((b,), cfg.pad_id, jnp.int32), k)

    def pick(think, force, ans, pad):
      sel = [phase == _THINK, phase == _FORCE, phase == _ANSWER]
      shape = (b,) + (1,) * (think.ndim - 1)
      return jnp.select([s.reshape(shape) for s in sel], [think, force, ans], pad)

    ids = pick(ids_t, ids_f, ids_d, ids_p)
    y = pick(y_t, y_f, y_d, y_p)
    tok = ids[:, 0]
    is_soft = (phase == _THINK) & cfg.soft
    seg = jnp.select([phase == _THINK, phase == _FORCE, phase == _ANSWER],
                     [SEG_THINK, SEG_FORCED, SEG_ANSWER], SEG_PAD).astype(jnp.int32)

    # Phase transitions.
    think_len = c["think_len"] + (phase == _THINK)
    low = entropy(logits_BxV, cfg.temperature) < cfg.cold_stop_entropy
    cold = jnp.where((phase == _THINK) & low, c["cold"] + 1, 0)
    is_eos = jnp.isin(tok, eos)
    cold_stop = (cfg.cold_stop_steps > 0) & (cold >= cfg.cold_stop_steps)
    think_next = jnp.where(is_eos, _DONE, jnp.where(
        tok == think_end, _ANSWER,
        jnp.where(cold_stop | (think_len >= cfg.think_budget), _FORCE, _THINK)))
    force_idx = jnp.where(phase == _FORCE, c["force_idx"] + 1, 0)
    force_next = jnp.where(force_idx >= n_forced, _ANSWER, _FORCE)
    ans_next = jnp.where(is_eos, _DONE, _ANSWER)
    new_phase = jnp.select([phase == _THINK, phase == _FORCE, phase == _ANSWER],
                           [think_next, force_next, ans_next], _DONE).astype(jnp.int32)

    x_Bx1xD = mixture_embeds(table_VxD, ids[:, None], y[:, None], mode=cfg.mode, tau=cfg.tau)
    next_logits, cache = model(embeds_BxTxD=x_Bx1xD, cache=c["cache"])
    return dict(
        step=step + 1, key=key, logits=next_logits[:, -1], phase=new_phase, cache=cache,
        force_idx=force_idx, think_len=think_len, cold=cold,
        ids=jax.lax.dynamic_update_slice(c["ids"], ids[:, None], (0, step, 0)),
        y=jax.lax.dynamic_update_slice(c["y"], y[:, None], (0, step, 0)),
        soft=c["soft"].at[:, step].set(is_soft),
        seg=c["seg"].at[:, step].set(seg))

  ids0, y0 = one_hot_action(jnp.full((b * n,), cfg.pad_id, jnp.int32), k)
  # The phase starts THINK at every row: the prompt template opens the <think> block.
  carry = dict(
      step=jnp.zeros((), jnp.int32), key=key, logits=logits[:, -1],
      phase=jnp.full((b,), _THINK if cfg.think_budget > 0 else _FORCE, jnp.int32),
      cache=cache, force_idx=jnp.zeros((b,), jnp.int32), think_len=jnp.zeros((b,), jnp.int32),
      cold=jnp.zeros((b,), jnp.int32), ids=ids0.reshape(b, n, k), y=y0.reshape(b, n, k),
      soft=jnp.zeros((b, n), bool), seg=jnp.zeros((b, n), jnp.int32))
  c = jax.lax.while_loop(cond, body, carry)
  seg = c["seg"]
  think = (seg == SEG_THINK) | (seg == SEG_FORCED)
  answer = seg == SEG_ANSWER
  return RolloutOutput(
      prompt_BxP=prompt_BxP, start_B=start_B, tokens_BxN=c["ids"][:, :, 0], ids_BxNxK=c["ids"],
      y_BxNxK=c["y"], soft_BxN=c["soft"], segment_BxN=seg,
      think_len_B=think.sum(-1).astype(jnp.int32), answer_len_B=answer.sum(-1).astype(jnp.int32),
      length_B=(seg != SEG_PAD).sum(-1).astype(jnp.int32))


def rebuild_inputs(embedding_VxD, out: RolloutOutput, *, mode: str, tau: float):
  """[B, P+N, D] input embeddings of prompt + response, detached (no gradient flows through
  the mixture: the policy gradient comes from the Gumbel density only, paper Eq. 7)."""
  prompt = jnp.take(embedding_VxD, out.prompt_BxP, axis=0)
  resp = mixture_embeds(embedding_VxD, out.ids_BxNxK, out.y_BxNxK, mode=mode, tau=tau)
  return jax.lax.stop_gradient(jnp.concatenate([prompt, resp.astype(prompt.dtype)], axis=1))


def response_texts(tokenizer, out: RolloutOutput, think_end_ids=()):
  """Host-side decode: (full response text, answer text) per row, cut at the row's length."""
  import numpy as np
  toks = np.asarray(out.tokens_BxN)
  seg = np.asarray(out.segment_BxN)
  eos = set(getattr(tokenizer, "eos_ids", ()) or ())
  full, answers = [], []
  for i in range(toks.shape[0]):
    keep = seg[i] != SEG_PAD
    row = [int(t) for t in toks[i][keep] if int(t) not in eos]
    ans = [int(t) for t, s in zip(toks[i], seg[i]) if s == SEG_ANSWER and int(t) not in eos]
    full.append(tokenizer.decode(row))
    answers.append(tokenizer.decode(ans))
  return full, answers
