"""Soft-thinking rollout: segmentation, forced think-end, EOS, soft inputs, scorer alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.config import tiny_config
from common.model import Decoder
from soft_grpo import logprob, modes
from soft_grpo.algorithm import score_actions
from soft_grpo.rollout import (SEG_ANSWER, SEG_FORCED, SEG_PAD, SEG_THINK, RolloutConfig,
                               rebuild_inputs, rollout)

B, P, N, K = 4, 6, 14, 4
TE = (250, 251, 252)   # a 3-piece "</think>"; the random model never emits it by chance


@pytest.fixture(scope="module")
def model_parts():
  model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rs = np.random.RandomState(0)
  prompt = jnp.asarray(rs.randint(3, 240, (B, P)), jnp.int32)
  start = jnp.asarray([0, 2, 1, 3], jnp.int32)
  return graphdef, nnx.to_pure_dict(state), prompt, start


def run(parts, **kw):
  graphdef, params, prompt, start = parts
  # Unfiltered discrete sampling (not the answer_top_k=5 default): with top-k 5 the random
  # model's near-uniform favourites would include a TE piece by chance.
  base = dict(mode="soft_gumbel", max_new_tokens=N, think_budget=5, top_k=K, top_p=0.95,
              think_end_ids=TE, eos_ids=(), pad_id=0, answer_top_k=0, answer_top_p=1.0)
  base.update(kw)
  cfg = RolloutConfig(**base)
  return cfg, jax.device_get(rollout(graphdef, params, prompt, start, cfg, jax.random.key(1)))


def expected_segments(tokens, think_end_last, eos, budget, n_forced, n):
  """Python transcription of the per-row phase machine (reference for the jitted loop)."""
  seg, phase, think, forced_i = [], "think", 0, 0
  for t in tokens[:n]:
    if phase == "done":
      seg.append(SEG_PAD)
      continue
    if phase == "think":
      seg.append(SEG_THINK)
      think += 1
      if t in eos:
        phase = "done"
      elif t == think_end_last:
        phase = "answer"
      elif think >= budget:
        phase, forced_i = "force", 0
    elif phase == "force":
      seg.append(SEG_FORCED)
      forced_i += 1
      if forced_i >= n_forced:
        phase = "answer"
    else:
      seg.append(SEG_ANSWER)
      if t in eos:
        phase = "done"
  return seg


@pytest.mark.parametrize("mode", ["soft_gumbel", "discrete"])
def test_budget_forces_think_end_string(model_parts, mode):
  cfg, out = run(model_parts, mode=mode)
  seg, toks = out.segment_BxN, out.tokens_BxN
  for b in range(B):
    np.testing.assert_array_equal(seg[b, :5], SEG_THINK)
    np.testing.assert_array_equal(seg[b, 5:8], SEG_FORCED)
    np.testing.assert_array_equal(toks[b, 5:8], TE)          # all pieces, in order
    np.testing.assert_array_equal(seg[b, 8:], SEG_ANSWER)
  np.testing.assert_array_equal(out.think_len_B, 8)
  np.testing.assert_array_equal(out.answer_len_B, N - 8)
  np.testing.assert_array_equal(out.length_B, N)
  # Storage: discrete positions are one-hot with y' = [0, -inf, ...].
  disc = ~out.soft_BxN
  np.testing.assert_array_equal(out.ids_BxNxK[disc][:, 1:], 0)
  assert np.all(np.isneginf(out.y_BxNxK[disc][:, 1:]))
  np.testing.assert_array_equal(out.y_BxNxK[disc][:, 0], 0.0)
  if mode == "discrete":
    assert not out.soft_BxN.any()
  else:
    np.testing.assert_array_equal(out.soft_BxN, seg == SEG_THINK)
    # Soft positions: K distinct ids sorted by y' (= by w) descending; recorded = argmax y'.
    ids, y = out.ids_BxNxK[out.soft_BxN], out.y_BxNxK[out.soft_BxN]
    assert all(len(set(r)) == K for r in ids.tolist())
    assert np.all(np.diff(np.where(np.isneginf(y), -1e9, y), axis=-1) <= 0)
    np.testing.assert_array_equal(out.tokens_BxN[out.soft_BxN], ids[:, 0])
  prompt_mask = np.asarray(out.prompt_mask_BxP)
  np.testing.assert_array_equal(prompt_mask.sum(-1), P - np.asarray(model_parts[3]))


@pytest.mark.parametrize("mode", ["soft", "discrete"])
def test_natural_think_end_and_eos_segmentation(model_parts, mode):
  # Runs with markers that never fire give the trajectories; the per-step keys do not depend
  # on the markers, so a marker chosen from a trajectory fires at its first occurrence.
  _, ref = run(model_parts, mode=mode, think_budget=N - len(TE))
  think_end = int(ref.tokens_BxN[0, 2])    # row 0 ends thinking naturally at step <= 2
  te = TE[:2] + (think_end,)
  _, ref2 = run(model_parts, mode=mode, think_budget=6, think_end_ids=te)
  eos = int(ref2.tokens_BxN[1, 10])        # row 1: answer phase by step 9, EOS by step 10
  cfg, out = run(model_parts, mode=mode, think_budget=6, think_end_ids=te, eos_ids=(eos,))
  for b in range(B):
    want = expected_segments(out.tokens_BxN[b].tolist(), think_end, {eos}, 6, 3, N)
    np.testing.assert_array_equal(out.segment_BxN[b], want, err_msg=f"row {b}")
    live = out.segment_BxN[b] != SEG_PAD
    np.testing.assert_array_equal(out.tokens_BxN[b][live], ref2.tokens_BxN[b][live])
    np.testing.assert_array_equal(out.tokens_BxN[b][~live], cfg.pad_id)
  assert SEG_FORCED not in out.segment_BxN[0]
  assert SEG_ANSWER in out.segment_BxN[0, :4]
  assert out.segment_BxN[1, -1] == SEG_PAD
  np.testing.assert_array_equal(out.length_B, (out.segment_BxN != SEG_PAD).sum(-1))
  np.testing.assert_array_equal(
      out.think_len_B, np.isin(out.segment_BxN, [SEG_THINK, SEG_FORCED]).sum(-1))


def test_noise_off_small_tau_feeds_argmax_embedding(model_parts):
  graphdef, params, _, _ = model_parts
  cfg, out = run(model_parts, noise_factor=0.0, tau=1e-4, record_embeds=True)
  table = np.asarray(params["embed_tokens"]["embedding"])
  x = out.embeds_BxNxD[out.soft_BxN]
  np.testing.assert_allclose(x, table[out.tokens_BxN[out.soft_BxN]], atol=1e-5)
  # With noise off the recorded token is the argmax of p~, i.e. of the logits; the KV-cache
  # decode must agree with one cache-free forward pass over the fed inputs.
  assert out.soft_BxN.sum() == B * 5
  prompt = jnp.take(jnp.asarray(table), model_parts[2], axis=0)
  x = jnp.concatenate([prompt, jnp.asarray(out.embeds_BxNxD[:, :-1])], axis=1)
  logits = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(embeds_BxTxD=x, start_B=s)[0])(
      params, x, model_parts[3])
  argmax = np.asarray(jnp.argmax(logits[:, P - 1:], axis=-1))
  np.testing.assert_array_equal(argmax[out.soft_BxN], out.tokens_BxN[out.soft_BxN])


@pytest.mark.parametrize("mode", ["soft_gumbel", "soft_gaussian", "soft_dirichlet"])
def test_scorer_rebuilds_fed_inputs_and_aligns(model_parts, mode):
  graphdef, params, prompt, start = model_parts
  cfg, out = run(model_parts, mode=mode, record_embeds=True)
  table = jnp.asarray(params["embed_tokens"]["embedding"])
  rebuilt = np.asarray(rebuild_inputs(table, out, cfg))
  np.testing.assert_allclose(rebuilt[:, P:], out.embeds_BxNxD, atol=1e-5)
  # Alignment: the action at response position n is scored by the logits computed from
  # the prefix prompt + response[:n], here recomputed position by position without a cache.
  logp = np.asarray(jax.jit(score_actions, static_argnums=(0, 3))(graphdef, params, out, cfg))
  last_logits = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(embeds_BxTxD=x, start_B=s)[0])
  for n in (0, 7):
    logits = last_logits(params, jnp.asarray(rebuilt[:, :P + n]), start)
    want = modes.action_logprobs(logits[:, -1:], jnp.asarray(out.ids_BxNxK[:, n:n + 1]),
                                 jnp.asarray(out.y_BxNxK[:, n:n + 1]),
                                 temperature=cfg.temperature, mode=mode,
                                 **modes.settings_of(cfg, mode))
    np.testing.assert_allclose(logp[:, n], np.asarray(want)[:, 0], atol=2e-5, rtol=1e-5)


def test_rollout_config_errors(model_parts):
  with pytest.raises(ValueError, match=r"^rollout\.mode: got 'hard'; allowed: "):
    RolloutConfig(mode="hard", think_end_ids=(1,))
  with pytest.raises(ValueError, match=r"^rollout\.think_budget: got 7; allowed: .* = \[0, 6\]$"):
    RolloutConfig(max_new_tokens=8, think_budget=7, think_end_ids=(1, 2))
  with pytest.raises(ValueError, match=r"^rollout\.top_k: got 1; allowed: an int >= 2$"):
    RolloutConfig(top_k=1, think_end_ids=(1,))
  # Without the "</think>" pieces (a config not yet given its tokenizer) the rollout refuses.
  graphdef, params, prompt, start = model_parts
  with pytest.raises(ValueError, match=r"^rollout\.think_end_ids: empty; allowed: "):
    rollout(graphdef, params, prompt, start, RolloutConfig(max_new_tokens=4, think_budget=2),
            jax.random.key(0))


def test_think_end_sequence_match(model_parts):
  _, ref = run(model_parts, mode="soft", think_budget=N - len(TE))
  a, b_ref = int(ref.tokens_BxN[0, 1]), int(ref.tokens_BxN[0, 2])
  # A sampled piece that continues the match is fed one-hot (E[a], issue 11), which changes
  # what follows: read the next piece off that trajectory.
  _, mid = run(model_parts, mode="soft", think_budget=6, think_end_ids=(a, 253),
               think_end_match="sequence")
  b = int(mid.tokens_BxN[0, 2])
  if a == b or a == b_ref or a in ref.tokens_BxN[0, :1] or b_ref in ref.tokens_BxN[0, :2]:
    pytest.skip("degenerate trajectory")
  first_answer = lambda out: int(np.argmax(out.segment_BxN[0] == SEG_ANSWER))
  _, out = run(model_parts, mode="soft", think_budget=6, think_end_ids=(a, b),
               think_end_match="sequence")
  assert first_answer(out) == 3                       # "a b" at steps 1-2 ends thinking
  # Both sampled pieces are discrete (one-hot), the thinking before them is soft.
  assert out.soft_BxN[0, 0] and not out.soft_BxN[0, 1:3].any()
  np.testing.assert_array_equal(out.ids_BxNxK[0, 1:3, 1:], 0)
  np.testing.assert_array_equal(out.tokens_BxN[0, 1:3], [a, b])
  _, out = run(model_parts, mode="soft", think_budget=6, think_end_ids=(253, b_ref),
               think_end_match="sequence")
  assert first_answer(out) == 6 + 2                  # only the budget ends it
  _, out = run(model_parts, mode="soft", think_budget=6, think_end_ids=(253, b_ref))
  assert first_answer(out) == 3                       # "last": the last piece alone


def test_cold_stop_forces_think_end_after_L_low_entropy_steps(model_parts):
  # Threshold above any entropy (log 256 ~ 5.5): fires after L = 2 steps at every row.
  _, out = run(model_parts, cold_stop_entropy=100.0, cold_stop_steps=2)
  np.testing.assert_array_equal(out.segment_BxN[:, :2], SEG_THINK)
  np.testing.assert_array_equal(out.segment_BxN[:, 2:5], SEG_FORCED)
  np.testing.assert_array_equal(out.tokens_BxN[:, 2:5], np.broadcast_to(TE, (B, 3)))
  # Threshold below any entropy: never fires; the budget (5) ends thinking.
  _, out = run(model_parts, cold_stop_entropy=1e-6, cold_stop_steps=2)
  np.testing.assert_array_equal(out.segment_BxN[:, 5:8], SEG_FORCED)


def _np_gumbel_kept_only(logits_BxV, ids_BxK, y_BxK, temperature):
  """Float64 Gumbel log-density with p^ over the kept (finite y') slots only (issue 11)."""
  z = np.take_along_axis(logits_BxV.astype(np.float64), ids_BxK, -1) / temperature
  kept = np.isfinite(y_BxK)
  e = np.where(kept, np.exp(z - z.max(-1, keepdims=True)), 0.0)
  lp = np.log(e / e.sum(-1, keepdims=True) + 1e-6)
  with np.errstate(invalid="ignore"):
    g = np.clip(np.where(kept, y_BxK, 0.0) - lp, -1.5, 3.0)
  m = (lp > -3) & kept
  return np.where(m, -g - np.exp(-g), 0.0).sum(-1) / np.maximum(m.sum(-1), 1)


def test_scoring_ignores_slots_removed_by_top_p(model_parts):
  """Issue 11 item 1 on a real rollout: top-p removes slots whose ids still carry
  probability; the trainer's scorer renormalises p^ over the kept slots only."""
  graphdef, params, prompt, start = model_parts
  cfg, out = run(model_parts, top_p=0.5, temperature=0.5, think_budget=8)
  soft = np.asarray(out.soft_BxN)
  removed = soft[..., None] & np.isneginf(out.y_BxNxK)
  assert removed.any(axis=-1).sum() >= 8          # many soft positions lost slots to top-p
  table = jnp.asarray(params["embed_tokens"]["embedding"])
  x = rebuild_inputs(table, out, cfg)
  logits = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(embeds_BxTxD=x, start_B=s)[0])(
      params, x[:, :-1], start)
  logits_BxNxV = np.asarray(logits[:, P - 1:])
  # The removed ids are real runner-ups: their current p^ is not negligible.
  z = np.take_along_axis(logits_BxNxV, out.ids_BxNxK, -1) / cfg.temperature
  p_all = np.exp(z - z.max(-1, keepdims=True))
  p_all /= p_all.sum(-1, keepdims=True)
  assert p_all[removed].max() > 0.05
  got = np.asarray(jax.jit(score_actions, static_argnums=(0, 3))(graphdef, params, out, cfg))
  want = _np_gumbel_kept_only(logits_BxNxV, out.ids_BxNxK, out.y_BxNxK, cfg.temperature)
  np.testing.assert_allclose(got[soft], want[soft], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["soft_gumbel", "soft"])
def test_think_end_pieces_are_one_hot_stored_fed_and_scored(model_parts, mode):
  """Issue 11 item 2: a sampled think-end piece (and every forced one) is stored one-hot,
  the next input is exactly E[piece], and the scorer treats it as a discrete token."""
  graphdef, params, prompt, start = model_parts
  table = np.asarray(params["embed_tokens"]["embedding"])
  _, ref = run(model_parts, mode=mode, think_budget=N - len(TE))
  think_end = int(ref.tokens_BxN[0, 2])     # row 0 samples this at step <= 2
  te = TE[:2] + (think_end,)
  cfg, out = run(model_parts, mode=mode, think_budget=6, think_end_ids=te, record_embeds=True)
  seg, toks = out.segment_BxN, out.tokens_BxN
  # Positions where a row sampled the think-end piece while thinking, and the forced pieces.
  sampled = (seg == SEG_THINK) & (toks == think_end)
  forced = seg == SEG_FORCED
  assert sampled[0].any() and sampled.sum() >= 1 and forced.any()
  for where in (sampled, forced):
    np.testing.assert_array_equal(out.ids_BxNxK[where][:, 1:], 0)
    np.testing.assert_array_equal(out.y_BxNxK[where][:, 0], 0.0)
    assert np.all(np.isneginf(out.y_BxNxK[where][:, 1:]))
    assert not out.soft_BxN[where].any()
    np.testing.assert_array_equal(out.embeds_BxNxD[where], table[toks[where]])
  # The other thinking positions stay soft.
  assert out.soft_BxN[(seg == SEG_THINK) & ~sampled].all()
  # Scored as an ordinary token: log softmax(logits / T)[piece].
  x = rebuild_inputs(jnp.asarray(table), out, cfg)
  np.testing.assert_allclose(np.asarray(x[:, P:]), out.embeds_BxNxD, atol=1e-5)
  logits = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(embeds_BxTxD=x, start_B=s)[0])(
      params, x[:, :-1], start)
  logp = np.asarray(jax.jit(score_actions, static_argnums=(0, 3))(graphdef, params, out, cfg))
  tok_lp = np.asarray(logprob.token_logprob(logits[:, P - 1:], jnp.asarray(toks),
                                            temperature=cfg.temperature))
  np.testing.assert_allclose(logp[sampled | forced], tok_lp[sampled | forced], atol=2e-5)


def test_rollout_config_answer_defaults_follow_official_scripts():
  cfg = RolloutConfig(think_end_ids=(1,))
  assert (cfg.answer_top_k, cfg.answer_top_p) == (5, 0.95)
  assert (cfg.top_k, cfg.top_p, cfg.tau) == (5, 0.95, 0.1)


def test_filtered_discrete_draws_stay_in_the_top_k_top_p_set(model_parts):
  """The rollout draws discrete tokens over the K candidates (`sample_top_k_top_p`); every
  sampled token is in `filter_logits`' kept set of the logits recomputed without a cache."""
  from common.sampler import filter_logits
  graphdef, params, prompt, start = model_parts
  cfg, out = run(model_parts, mode="discrete", answer_top_k=3, answer_top_p=0.5,
                 temperature=0.7)
  tokens = jnp.concatenate([prompt, jnp.asarray(out.tokens_BxN)], axis=1)
  logits = nnx.merge(graphdef, params)(tokens[:, :-1], start_B=start)[0][:, P - 1:]
  kept = np.asarray(filter_logits(logits / 0.7, top_k=3, top_p=0.5)) > -1e30
  act = np.asarray(out.action_mask_BxN)
  assert act.sum() > 10
  tok = np.asarray(out.tokens_BxN)
  b_idx, n_idx = np.nonzero(act)
  assert kept[b_idx, n_idx, tok[b_idx, n_idx]].all()
  # Fewer than 3 candidates are often kept (top-p bites), so the check is not vacuous.
  assert (kept[b_idx, n_idx].sum(-1) < 3).any()
