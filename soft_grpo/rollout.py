"""Soft-thinking rollouts (SofT-GRPO, arXiv 2511.06411): pure JAX, jitted, KV cache, while_loop.

One prefill call over the left-padded prompts, then a `lax.while_loop` that decodes every row
through three phases (per row, vectorized over the batch):

  THINK   each step emits a *soft token*: the top-k ids of p~ (top-k, then top-p filtered and
          renormalized softmax(logits / T)) and their perturbed log-weights y'; the next input
          embedding is sum_i w_i E[id_i] with w = softmax(y' / tau) (mode-dependent; the
          step is `modes.soft_thinking_step`, dispatched by the mode registry). The
          recorded token is argmax y' (a Gumbel-max sample in soft_gumbel).
          Mode "discrete" samples an ordinary token here instead (the GRPO baseline).
  FORCE   the think-end string (all of its token pieces) is force-inserted when the thinking
          budget is spent or the optional cold stop fires (entropy of the unfiltered p below
          a threshold for L consecutive steps).
  ANSWER  discrete top-k/top-p sampling until EOS or the length limit.

Thinking ends (THINK -> ANSWER) when the recorded token equals `think_end_ids[-1]`, the last
piece of the tokenizer's encoding of "</think>" (SmolLM2 has no single "</think>" token; its
last piece is ">", so `think_end_match="sequence"` instead requires all pieces in a row).
EOS during thinking ends the row.

Every piece of the think-end string is a discrete token (official: the `</think>` position is
set one-hot, the next input is E[`</think>`], the trainer scores it as a token): forced pieces,
and a sampled thinking position whose recorded token ends thinking or continues a match of the
piece sequence (decided when it is sampled, so in "sequence" mode a prefix that is not completed
was still fed one-hot).

Storage per response position n (the action taken at n): `ids_BxNxK` and `y_BxNxK`, sorted by
w descending. Discrete positions (answer, forced, think-end pieces, every position in mode
"discrete") are one-hot: ids = [tok, 0, ..., 0], y' = [0, -inf, ..., -inf]; `rebuild_inputs` recreates from
them exactly the embeddings the rollout fed (same w, `modes.rebuild_soft_inputs`). The loop
state is the typed `RolloutState`.
Formulas follow the official code (zz1358m/SofT-GRPO-master, SGLang soft-thinking sampler).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.sampler import filter_logits
from soft_grpo import modes, soft_token
from soft_grpo import validate as v

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
  tau: float = 0.1                  # Gumbel-softmax temperature (0.1 train; evaluation uses
                                    # GRPOConfig.eval_tau = 0.5, the official inference tau)
  noise_factor: float = 1.0         # scale of the Gumbel / Gaussian noise
  dirichlet_alpha: float = 1.0      # soft_dirichlet concentration scale
  gaussian_std: float = 0.05        # soft_gaussian noise std
  # Discrete sampling (answer phase; every step in "discrete"); official scripts: 5 / 0.95.
  answer_top_k: int = 5             # 0 = off
  answer_top_p: float = 0.95
  think_end: str = "</think>"       # the string; `Config.for_tokenizer` encodes it
  think_end_ids: tuple[int, ...] = ()   # token pieces of "</think>"; detection on the last one
  # "last": thinking ends on the last piece alone (the rule; exact for a single
  # "</think>" token). "sequence": on the whole piece sequence, for tokenizers like SmolLM2's
  # where the last piece (">") is common on its own.
  think_end_match: str = "last"
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  cold_stop_entropy: float = 0.0    # 0 = cold stop off
  cold_stop_steps: int = 0          # L consecutive low-entropy steps
  record_embeds: bool = False       # also return the fed input embeddings (tests)

  def __post_init__(self):
    s = "rollout"
    modes.get_mode(self.mode)
    v.check_int(s, "max_new_tokens", self.max_new_tokens, 1)
    # K = 1 soft tokens would be indistinguishable from one-hot discrete positions.
    v.check_int(s, "top_k", self.top_k, 2)
    v.check_number(s, "top_p", self.top_p, 0.0, strict=True, hi=1.0)
    v.check_number(s, "answer_top_p", self.answer_top_p, 0.0, strict=True, hi=1.0)
    v.check_int(s, "answer_top_k", self.answer_top_k, 0)
    v.check_number(s, "temperature", self.temperature, 0.0, strict=True)
    v.check_number(s, "tau", self.tau, 0.0, strict=True)
    v.check_number(s, "noise_factor", self.noise_factor, 0.0)
    v.check_number(s, "dirichlet_alpha", self.dirichlet_alpha, 0.0, strict=True)
    v.check_number(s, "gaussian_std", self.gaussian_std, 0.0)
    v.check_choice(s, "think_end_match", self.think_end_match, ("last", "sequence"))
    v.require(isinstance(self.think_end, str) and bool(self.think_end), s, "think_end",
              self.think_end, "a non-empty string")
    v.require(all(v.is_int(i) and i >= 0 for i in self.think_end_ids), s, "think_end_ids",
              self.think_end_ids, "token ids >= 0 (empty: encode rollout.think_end)")
    # The one think-budget rule. Until the tokenizer is known (`Config.for_tokenizer`),
    # "</think>" counts as one piece; the check runs again with the real pieces.
    n_end = max(1, len(self.think_end_ids))
    v.require(v.is_int(self.think_budget) and 0 <= self.think_budget <= (
        self.max_new_tokens - n_end), s, "think_budget", self.think_budget,
        f"[0, max_new_tokens - len(think_end_ids)] = [0, {self.max_new_tokens - n_end}]")
    v.check_number(s, "cold_stop_entropy", self.cold_stop_entropy, 0.0)
    v.check_int(s, "cold_stop_steps", self.cold_stop_steps, 0)

  @property
  def soft(self) -> bool:
    return modes.get_mode(self.mode).soft


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
  embeds_BxNxD: jax.Array | None = None   # fed input embeddings (cfg.record_embeds only)

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


# ----------------------------------------------------------------------------- helpers


def soft_step_kwargs(cfg: RolloutConfig) -> dict:
  """Keyword arguments of `modes.soft_thinking_step` for this config (the mode's own
  settings only)."""
  return dict(mode=cfg.mode, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
              **modes.settings_of(cfg, cfg.mode))


class RolloutState(NamedTuple):
  """The `lax.while_loop` carry of `rollout` (B rows, N response positions, K slots)."""
  step: jax.Array            # int32 []: response position being decoded
  key: jax.Array             # PRNG key
  logits_BxV: jax.Array      # logits for the current position
  phase_B: jax.Array         # int32 _THINK / _FORCE / _ANSWER / _DONE per row
  cache: Any                 # the decoder's KV cache
  force_idx_B: jax.Array     # int32: think-end pieces force-inserted so far
  think_len_B: jax.Array     # int32: thinking steps taken (the budget counts these)
  cold_B: jax.Array          # int32: consecutive low-entropy thinking steps (cold stop)
  match_B: jax.Array         # int32: think-end pieces matched so far
  ids_BxNxK: jax.Array       # int32 stored ids per position
  y_BxNxK: jax.Array         # float32 stored y' per position
  soft_BxN: jax.Array        # bool: position was a soft token
  segment_BxN: jax.Array     # int32 SEG_* code per position
  embeds_BxNxD: jax.Array | None   # fed input embeddings (cfg.record_embeds), else None


# ----------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("rows_per_prompt",))
def rollout(graphdef, params, prompt_BxP, start_B, cfg: RolloutConfig, key, *,
            rows_per_prompt: int = 1):
  """Runs one batch of rollouts. `params`: the model state (nnx.State or its pure dict).

  `rows_per_prompt` G > 1: rows come in consecutive runs of G with the same prompt (GRPO
  groups, the caller guarantees it); the prompt is prefilled once per run and its cache and
  last logits repeated for the G rows (same values, 1/G of the prefill work)."""
  if not cfg.think_end_ids:
    raise ValueError("rollout.think_end_ids: empty; allowed: the token ids of '</think>' "
                     "(`Config.for_tokenizer` fills them in)")
  model = nnx.merge(graphdef, params)
  b, p_len = prompt_BxP.shape
  n, k = cfg.max_new_tokens, cfg.top_k
  table_VxD = model.embedding_table_VxD
  g = max(1, int(rows_per_prompt))
  if b % g:
    raise ValueError(f"rollout: rows_per_prompt {g} does not divide the {b} rows; allowed: a "
                     "divisor of the batch (rows in consecutive runs of one prompt)")
  cache = model.init_cache(b // g, p_len + n, start_B=start_B[::g])
  # Prefill in two calls so that only the last prompt position's [B, V] logits exist: the
  # first call's logits are unused and XLA drops their (vocabulary-wide) computation.
  if p_len > 1:
    _, cache = model(prompt_BxP[::g, :-1], cache=cache, return_hidden=True)
  logits, cache = model(prompt_BxP[::g, -1:], cache=cache)
  if g > 1:
    cache = cache.repeat_rows(g)
    logits = jnp.repeat(logits, g, axis=0)
  eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)
  forced = jnp.asarray(cfg.think_end_ids, jnp.int32)
  think_end = cfg.think_end_ids[-1]
  n_forced = len(cfg.think_end_ids)
  step_kwargs = soft_step_kwargs(cfg)

  def cond(c: RolloutState):
    return (c.step < n) & ~jnp.all(c.phase_B == _DONE)

  def body(c: RolloutState) -> RolloutState:
    step, phase = c.step, c.phase_B
    key, k_think, k_ans = jax.random.split(c.key, 3)
    logits_BxV = c.logits_BxV
    # Discrete sample: the answer phase everywhere, and every phase in mode "discrete".
    # With answer_top_k set, drawn over the K candidates only (same distribution, no
    # vocabulary-wide sort or noise per step).
    if 0 < cfg.answer_top_k < logits_BxV.shape[-1]:
      tok_d = soft_token.sample_top_k_top_p(k_ans, logits_BxV, temperature=cfg.temperature,
                                            top_k=cfg.answer_top_k, top_p=cfg.answer_top_p)
    else:
      tok_d = jax.random.categorical(k_ans, filter_logits(
          logits_BxV / cfg.temperature, top_k=cfg.answer_top_k, top_p=cfg.answer_top_p))
    ids_d, y_d = soft_token.one_hot_action(tok_d.astype(jnp.int32), k)
    if cfg.soft:
      st = modes.soft_thinking_step(k_think, logits_BxV, table_VxD, **step_kwargs)
      ids_t, y_t, x_t = st.ids_BxK, st.y_prime_BxK, st.next_embed_BxD
    else:
      ids_t, y_t, x_t = ids_d, y_d, None
    force_tok = forced[jnp.minimum(c.force_idx_B, n_forced - 1)]
    ids_f, y_f = soft_token.one_hot_action(force_tok, k)
    ids_p, y_p = soft_token.one_hot_action(jnp.full((b,), cfg.pad_id, jnp.int32), k)
    in_think, in_force, in_ans = phase == _THINK, phase == _FORCE, phase == _ANSWER

    def pick(think, force, ans, pad):
      shape = (b,) + (1,) * (think.ndim - 1)
      conds = [x.reshape(shape) for x in (in_think, in_force, in_ans)]
      return jnp.select(conds, [think, force, ans], pad)

    tok = pick(ids_t, ids_f, ids_d, ids_p)[:, 0]   # argmax y' at soft positions
    # Think-end pieces are discrete tokens (official: the `</think>` position is set one-hot,
    # the next input is E[`</think>`] and the trainer scores it as a token). A sampled piece
    # is one-hot when it ends thinking or continues a match of the think-end sequence; the
    # choice is made when it is sampled, before the next input is fed.
    match = jnp.where(tok == forced[jnp.minimum(c.match_B, n_forced - 1)], c.match_B + 1,
                      (tok == forced[0]).astype(jnp.int32))
    match = jnp.where(in_think, match, 0)
    if cfg.think_end_match == "sequence":
      ended = match >= n_forced
    else:
      ended = tok == think_end
    think_piece = in_think & ((match > 0) | ended)
    ids_tp, y_tp = soft_token.one_hot_action(tok, k)
    ids_t = jnp.where(think_piece[:, None], ids_tp, ids_t)
    y_t = jnp.where(think_piece[:, None], y_tp, y_t)
    ids = pick(ids_t, ids_f, ids_d, ids_p)
    y = pick(y_t, y_f, y_d, y_p)
    is_soft = in_think & ~think_piece & cfg.soft
    seg = jnp.select([in_think, in_force, in_ans],
                     [SEG_THINK, SEG_FORCED, SEG_ANSWER], SEG_PAD).astype(jnp.int32)

    # Phase transitions.
    think_len = c.think_len_B + in_think
    if cfg.cold_stop_steps > 0:   # static: no vocabulary-wide entropy when cold stop is off
      ent_B = soft_token.entropy_from_logits(logits_BxV, temperature=cfg.temperature)
      cold = jnp.where(in_think & (ent_B < cfg.cold_stop_entropy), c.cold_B + 1, 0)
      cold_stop = cold >= cfg.cold_stop_steps
    else:
      cold, cold_stop = c.cold_B, jnp.zeros((b,), bool)
    is_eos = jnp.isin(tok, eos)
    # `match`: pieces of the think-end string matched so far (computed above; the pieces are
    # short and do not overlap themselves in practice, so a restart on the first piece is
    # enough).
    think_next = jnp.where(is_eos, _DONE, jnp.where(
        ended, _ANSWER,
        jnp.where(cold_stop | (think_len >= cfg.think_budget), _FORCE, _THINK)))
    force_idx = jnp.where(in_force, c.force_idx_B + 1, 0)
    force_next = jnp.where(force_idx >= n_forced, _ANSWER, _FORCE)
    ans_next = jnp.where(is_eos, _DONE, _ANSWER)
    new_phase = jnp.select([in_think, in_force, in_ans],
                           [think_next, force_next, ans_next], _DONE).astype(jnp.int32)

    # Next input: the soft mixture at soft positions, E[tok] (exact) everywhere else.
    x_BxD = jnp.take(table_VxD, tok, axis=0)
    if x_t is not None:
      x_BxD = jnp.where(is_soft[:, None], x_t.astype(x_BxD.dtype), x_BxD)
    next_logits, cache = model(embeds_BxTxD=x_BxD[:, None], cache=c.cache)
    embeds = c.embeds_BxNxD
    if cfg.record_embeds:
      embeds = jax.lax.dynamic_update_slice(embeds, x_BxD[:, None].astype(jnp.float32),
                                            (0, step, 0))
    return RolloutState(
        step=step + 1, key=key, logits_BxV=next_logits[:, -1], phase_B=new_phase, cache=cache,
        force_idx_B=force_idx, think_len_B=think_len, cold_B=cold, match_B=match,
        ids_BxNxK=jax.lax.dynamic_update_slice(c.ids_BxNxK, ids[:, None], (0, step, 0)),
        y_BxNxK=jax.lax.dynamic_update_slice(c.y_BxNxK, y[:, None], (0, step, 0)),
        soft_BxN=c.soft_BxN.at[:, step].set(is_soft),
        segment_BxN=c.segment_BxN.at[:, step].set(seg),
        embeds_BxNxD=embeds)

  ids0, y0 = soft_token.one_hot_action(jnp.full((b, n), cfg.pad_id, jnp.int32), k)
  zeros_B = jnp.zeros((b,), jnp.int32)
  # Every row starts in THINK: the prompt template opens the <think> block.
  init = RolloutState(
      step=jnp.zeros((), jnp.int32), key=key, logits_BxV=logits[:, -1],
      phase_B=jnp.full((b,), _THINK if cfg.think_budget > 0 else _FORCE, jnp.int32),
      cache=cache, force_idx_B=zeros_B, think_len_B=zeros_B, cold_B=zeros_B, match_B=zeros_B,
      ids_BxNxK=ids0, y_BxNxK=y0, soft_BxN=jnp.zeros((b, n), bool),
      segment_BxN=jnp.zeros((b, n), jnp.int32),
      embeds_BxNxD=(jnp.zeros((b, n, table_VxD.shape[1]), jnp.float32)
                    if cfg.record_embeds else None))
  c = jax.lax.while_loop(cond, body, init)
  seg = c.segment_BxN
  think = (seg == SEG_THINK) | (seg == SEG_FORCED)
  return RolloutOutput(
      prompt_BxP=prompt_BxP, start_B=start_B, tokens_BxN=c.ids_BxNxK[:, :, 0],
      ids_BxNxK=c.ids_BxNxK, y_BxNxK=c.y_BxNxK, soft_BxN=c.soft_BxN, segment_BxN=seg,
      think_len_B=think.sum(-1).astype(jnp.int32),
      answer_len_B=(seg == SEG_ANSWER).sum(-1).astype(jnp.int32),
      length_B=(seg != SEG_PAD).sum(-1).astype(jnp.int32),
      embeds_BxNxD=c.embeds_BxNxD)


def rebuild_inputs(embedding_VxD, out: RolloutOutput, cfg: RolloutConfig):
  """[B, P+N, D] input embeddings of prompt + response, detached: no gradient flows through
  the mixture (official dp_actor.py `inputs_embeds=topk_embs.detach()`)."""
  prompt = jnp.take(embedding_VxD, out.prompt_BxP, axis=0)
  resp = modes.rebuild_soft_inputs(out.ids_BxNxK, out.y_BxNxK, embedding_VxD, mode=cfg.mode,
                                   **modes.settings_of(cfg, cfg.mode))
  return jax.lax.stop_gradient(jnp.concatenate([prompt, resp.astype(prompt.dtype)], axis=1))


def response_texts(tokenizer, out: RolloutOutput):
  """Host-side decode: (full response text, answer text) per row, cut at the row's length."""
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
