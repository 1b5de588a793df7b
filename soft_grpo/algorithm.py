"""SofT-GRPO / GRPO algorithm: pure functions (scoring, objective, update, micro-batching).

The loop that feeds them (data order, prompts, rollouts, rewards, checkpoints, metrics,
evaluation) is `soft_grpo.learner` (tunix `rl/algo_core.py` vs `rl/grpo/grpo_learner.py`).

Scoring rebuilds the inputs from the stored (ids, y') with the rollout's own w, detached
(no gradient through the mixture: official dp_actor.py feeds `topk_embs.detach()`); the logits
at position t score the action stored at t+1. Mode "discrete" is plain GRPO: inputs are token
ids (so, as in verl, the input embedding also gets gradient) and every action is a token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.optim import optimizer as optimizer_lib
from common.train import guard as guard_lib
from common.train.train_state import TrainState
from soft_grpo import loss as loss_lib
from soft_grpo import modes
from soft_grpo.config import Config, OptimConfig
from soft_grpo.rollout import RolloutConfig, RolloutOutput, rebuild_inputs


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Grad-norm clip then AdamW, constant LR (official verl actor defaults for SofT-GRPO):
  the one optimizer factory with no schedule and no decay mask."""
  tx, _ = optimizer_lib.make_optimizer(
      lr=cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, decay_mask=None)
  return tx


def init_state(params, cfg: Config) -> TrainState:
  """Step 0 of the one `TrainState`, with the frozen reference policy set."""
  params = jax.tree.map(jnp.asarray, params)
  return TrainState.create(params=params, optimizer=make_optimizer(cfg.optim), seed=cfg.seed,
                           ref_params=jax.tree.map(jnp.copy, params))


def shared_prompt_forward_applies(model_config) -> bool:
  """Whether scoring may run a group's prompt once (`Decoder.shared_prefix_hidden`): not with
  remat (the cached forward keeps its activations) and not with LS-attention (its plain forward
  calls the windowed kernel; the cached one attends densely over the whole prefix)."""
  return model_config.remat == "none" and model_config.attention == "mhsa"


def score_actions(graphdef, params, out: RolloutOutput, rcfg: RolloutConfig, *,
                  rows_per_prompt: int = 1):
  """log pi(action_n | prefix) for every response position n -> [B, N] float32.

  `rows_per_prompt` G > 1 says that rows come in consecutive runs of G with the same prompt
  (the learner's prompt-major groups): each prompt is then run once and its keys/values shared
  by its G rows (`Decoder.shared_prefix_hidden`; same values and gradients) where
  `shared_prompt_forward_applies`. The caller guarantees the layout; 1 (the default) assumes
  nothing.
  """
  model = nnx.merge(graphdef, params)
  p_len = out.prompt_BxP.shape[1]
  n = out.tokens_BxN.shape[1]
  if modes.get_mode(rcfg.mode).soft:
    inputs = rebuild_inputs(model.embedding_table_VxD, out, rcfg)[:, :-1]
  else:   # plain GRPO: token inputs, so the input embedding gets gradient too (as in verl)
    inputs = jnp.concatenate([out.prompt_BxP, out.tokens_BxN], axis=1)[:, :-1]
  # Logits at slot t score the action stored at t + 1 (official torch.roll(shifts=-1)): the
  # hidden states at slots p_len - 1 .. p_len + n - 2 (the last prompt slot, then the response).
  # The LM head runs at these N slots only (not over the prompt's P - 1).
  g = rows_per_prompt
  if g > 1 and p_len > 1 and shared_prompt_forward_applies(model.config):
    h = model.shared_prefix_hidden(inputs[::g, :p_len - 1], inputs[:, p_len - 1:],
                                   start_P=out.start_B[::g], rows_per_prefix=g)
  else:
    h, _ = (model(inputs, start_B=out.start_B, return_hidden=True)
            if inputs.ndim == 2 else
            model(embeds_BxTxD=inputs, start_B=out.start_B, return_hidden=True))
    h = h[:, p_len - 1:p_len - 1 + n]
  logits_BxNxV = model.logits(h)
  return modes.action_logprobs(logits_BxNxV, out.ids_BxNxK, out.y_BxNxK,
                               temperature=rcfg.temperature, mode=rcfg.mode,
                               **modes.settings_of(rcfg, rcfg.mode))


def grpo_objective(params, graphdef, batch, cfg: Config, rows_per_prompt: int = 1):
  out: RolloutOutput = batch["rollout"]
  logp = score_actions(graphdef, params, out, cfg.rollout, rows_per_prompt=rows_per_prompt)
  # No stored old log-probs: the parameters are the rollout's (first update of a single-epoch
  # step), so pi_old = pi_theta numerically and the ratio is 1 with the PPO gradient.
  old = batch.get("old_logp_BxN")
  old = jax.lax.stop_gradient(logp) if old is None else old
  mask = out.action_mask_BxN
  adv = batch["advantages_B"][:, None] * mask.astype(jnp.float32)
  return loss_lib.grpo_loss(logp, old, batch["ref_logp_BxN"], adv, mask,
                            config=cfg.loss, weights_BxT=batch.get("loss_weights_BxN"))


def split_micro(x, m: int):
  """[R, ...] -> [m, R/m, ...] with micro-batch j = rows j, j+m, ...: every micro-batch
  keeps rows on every data shard, so a batch-sharded array stays evenly sharded."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def merge_micro(x):
  """Inverse of `split_micro`."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def micro_rows_per_prompt(rows_per_prompt: int, m: int) -> int:
  """Rows per prompt inside each `split_micro(x, m)` micro-batch of a batch of consecutive
  G-row groups: micro-batch j takes rows j, j+m, ..., so when m divides G its entries come in
  runs of G/m from one prompt; otherwise no such layout is guaranteed (1)."""
  if m <= 1:
    return rows_per_prompt
  return rows_per_prompt // m if rows_per_prompt % m == 0 else 1


def score_in_chunks(graphdef, params, out: RolloutOutput, rcfg: RolloutConfig, chunks: int, *,
                    rows_per_prompt: int = 1):
  """`score_actions` over `chunks` sequential row chunks (bounds the [B, T, V] logits)."""
  if chunks <= 1:
    return score_actions(graphdef, params, out, rcfg, rows_per_prompt=rows_per_prompt)
  g = micro_rows_per_prompt(rows_per_prompt, chunks)
  micro = jax.tree.map(lambda x: split_micro(x, chunks), out)
  return merge_micro(jax.lax.map(
      lambda o: score_actions(graphdef, params, o, rcfg, rows_per_prompt=g), micro))


def update_step(state: TrainState, batch, *, graphdef, cfg: Config, rows_per_prompt: int = 1):
  """One AdamW step on one mini-batch: state -> (state, metrics).

  The token weights of `cfg.loss.loss_agg` are computed on the whole mini-batch, so with
  `cfg.grpo.micro_batch_rows` the gradients (and metrics) summed over the memory
  micro-batches (a `lax.scan`) are those of the whole mini-batch's loss.

  A bad update (non-finite loss / gradient norm / new parameters, or the parameter norm growing
  more than `cfg.run.max_param_norm_ratio`) keeps the old parameters and optimizer state;
  metrics `finite` / `bad_reason` (common.train.guard codes) say so, and `num_nonfinite` counts.
  """
  grad_fn = jax.grad(grpo_objective, has_aux=True)
  batch = dict(batch, loss_weights_BxN=loss_lib.loss_token_weights(
      batch["rollout"].action_mask_BxN, loss_agg=cfg.loss.loss_agg,
      micro_rows=cfg.loss.loss_agg_micro_rows))
  m = cfg.grpo.num_micro_batches
  if m <= 1:
    grads, metrics = grad_fn(state.params, graphdef, batch, cfg, rows_per_prompt)
  else:
    g = micro_rows_per_prompt(rows_per_prompt, m)
    micro = jax.tree.map(lambda x: split_micro(x, m), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(state.params, graphdef, first, cfg, g))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, grad_fn(state.params, graphdef, mb, cfg, g)), None
    (grads, metrics), _ = jax.lax.scan(body, init, micro)
  updates, new_opt = make_optimizer(cfg.optim).update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # The one guard of both trainers (common/train/guard.py): a non-finite loss, gradient or new
  # parameters, or an absurd jump of the parameter norm -> the old params and optimizer state.
  check = guard_lib.check_update(
      metrics["loss"], grad_norm, state.params, new_params,
      max_param_norm_ratio=cfg.run.max_param_norm_ratio)
  params = guard_lib.keep_if(check.ok, new_params, state.params)
  opt_state = guard_lib.keep_if(check.ok, new_opt, state.opt_state)
  num_nonfinite = state.num_nonfinite + (~check.ok).astype(jnp.int32)
  metrics = dict(metrics, grad_norm=grad_norm, finite=check.ok, bad_reason=check.reason,
                 param_norm=check.param_norm, prev_param_norm=check.prev_param_norm)
  return state.replace(params=params, opt_state=opt_state, num_nonfinite=num_nonfinite), metrics
