"""Pure language-model train and eval steps: `train_step(state, batch) -> (state, metrics)`.

A batch is a dict of arrays with a leading gradient-accumulation axis A:
  inputs  int32 [A, B, T]   token ids
  targets int32 [A, B, T]   next-token ids
  weights f32   [A, B, T]   optional per-token loss weights (default 1)
Micro-batches are summed with `lax.scan`, so memory is that of one micro-batch. Within one,
the decoder blocks are rematerialised as `ModelConfig.remat` says and the cross-entropy is
computed over chunks of `StepConfig.loss_chunk_tokens` tokens (common.losses.chunked_lm_loss),
so the [B, T, V] float32 logits are never alive at once.

A bad update never reaches the parameters (common/train/guard.py: non-finite loss, gradient
or new parameters, or a parameter-norm jump beyond `max_param_norm_ratio`): the step keeps
the old params and optimizer state and reports it in the metrics (`finite` = update applied,
`bad_reason`, `num_nonfinite` = updates skipped so far); the host decides whether to stop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common import losses
from common.config import field_error
from common.train import guard
from common.train.metrics import spike_update
from common.train.train_state import TrainState, merge_model


@dataclasses.dataclass(frozen=True)
class StepConfig:
  z_loss_coef: float = 0.0           # PaLM z-loss weight (common.losses); 0 disables it
  spike_threshold: float = 0.5       # nats above the loss EMA that count as a spike
  spike_ema_decay: float = 0.95
  inject_nan_at_step: int = -1       # test hook: make this step's loss NaN (-1: never)
  loss_chunk_tokens: int = losses.DEFAULT_CHUNK_TOKENS  # tokens per LM-head/CE chunk

  def __post_init__(self):
    if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 1:
      raise field_error("step.loss_chunk_tokens", f"got {self.loss_chunk_tokens!r}",
                        "a positive int")
    for name in ("z_loss_coef", "spike_threshold"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise field_error(f"step.{name}", f"got {v!r}", "a finite number >= 0")
    if not 0 <= self.spike_ema_decay < 1:
      raise field_error("step.spike_ema_decay", f"got {self.spike_ema_decay!r}", "[0, 1)")
    if not isinstance(self.inject_nan_at_step, int):
      raise field_error("step.inject_nan_at_step", f"got {self.inject_nan_at_step!r}",
                        "an int (-1: never)")


_LAYER_RE = re.compile(r"layers/(\d+)/")


def per_layer_max_logits(intermediates, num_layers: int):
  """Max |pre-softmax logit| per layer, for local and global heads: ([L], [L]).

  Reads the `attn_stats` every attention layer sows (common/attention.py protocol); the
  layer index is taken from the path, so any attention module nesting works.
  """
  local = [jnp.zeros((), jnp.float32)] * num_layers
  glob = [jnp.zeros((), jnp.float32)] * num_layers
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(intermediates))[0]
  for path, leaf in flat:
    keys = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
    joined = "/".join(keys) + "/"
    m = _LAYER_RE.search(joined)
    if m is None:
      continue
    i = int(m.group(1))
    v = jnp.max(jnp.asarray(leaf, jnp.float32))
    if "local_max_abs_logit" in keys:
      local[i] = jnp.maximum(local[i], v)
    elif "global_max_abs_logit" in keys:
      glob[i] = jnp.maximum(glob[i], v)
  return jnp.stack(local), jnp.stack(glob)


def lm_loss(params, model_rest, graphdef, micro, *, z_loss_coef: float, nan_scale=1.0,
            collect_stats: bool = True, chunk_tokens: int = losses.DEFAULT_CHUNK_TOKENS):
  """Loss of one micro-batch: cross-entropy (+ z_loss_coef * z-loss), computed over sequence
  chunks so [B, T, V] logits are never alive at once. Returns (loss, aux); aux has the
  per-layer max |logit| only with collect_stats (the attention stats pass)."""
  model = merge_model(graphdef, params, model_rest)
  h_BxTxD, _ = model(micro["inputs"], collect_stats=collect_stats, return_hidden=True)
  loss, parts = losses.chunked_lm_loss(h_BxTxD, model.head_DxV, micro["targets"],
                                       micro.get("weights"), z_loss_coef=z_loss_coef,
                                       chunk_tokens=chunk_tokens)
  loss = loss * nan_scale
  aux = {"ce": parts["ce"], "z_loss": parts["z_loss"]}
  if collect_stats:
    local_L, global_L = per_layer_max_logits(nnx.pop(model, nnx.Intermediate),
                                             model.config.num_layers)
    aux["max_logit_local"] = jax.lax.stop_gradient(local_L)
    aux["max_logit_global"] = jax.lax.stop_gradient(global_L)
  return loss, aux


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    lr_schedule: Callable, config: StepConfig, *, collect_stats: bool = True,
                    max_param_norm_ratio: float = 2.0):
  """Builds the pure `train_step(state, batch) -> (state, metrics)`.

  collect_stats=False compiles a step without the attention-stats pass (no max_logit_*
  metrics): the loop uses it on steps that do not log, so on TPU no step pays for an extra
  XLA score pass it does not report.
  """

  def train_step(state: TrainState, batch):
    nan_scale = jnp.where(state.step == config.inject_nan_at_step, jnp.nan, 1.0)
    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)

    def micro_step(grads_acc, micro):
      (loss, aux), grads = grad_fn(state.params, state.model_rest, graphdef, micro,
                                   z_loss_coef=config.z_loss_coef, nan_scale=nan_scale,
                                   collect_stats=collect_stats,
                                   chunk_tokens=config.loss_chunk_tokens)
      return jax.tree.map(jnp.add, grads_acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads_sum, (loss_A, aux_A) = jax.lax.scan(micro_step, zeros, batch)
    num_micro = loss_A.shape[0]
    grads = jax.tree.map(lambda g: g / num_micro, grads_sum)
    loss = jnp.mean(loss_A)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    update_norm = optax.tree.norm(updates)
    # One guard for both trainers (common/train/guard.py): non-finite loss, gradient or new
    # parameters, or an absurd jump of the parameter norm -> keep the old state.
    check = guard.check_update(
        loss, grad_norm, state.params, new_params, max_param_norm_ratio=max_param_norm_ratio)
    ok = finite = check.ok
    params = guard.keep_if(ok, new_params, state.params)
    opt_state = guard.keep_if(ok, new_opt, state.opt_state)
    loss_ema, num_spikes, is_spike = spike_update(
        state.loss_ema, state.num_spikes, loss, threshold=config.spike_threshold,
        decay=config.spike_ema_decay)
    num_nonfinite = state.num_nonfinite + (~finite).astype(jnp.int32)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    # optax's schedule count advances only on applied updates (skipped steps keep opt_state).
    applied = state.step - state.num_nonfinite
    metrics = {
        "loss": loss, "ce": jnp.mean(aux_A["ce"]), "z_loss": jnp.mean(aux_A["z_loss"]),
        "grad_norm": grad_norm, "update_norm": update_norm,
        "lr": jnp.asarray(lr_schedule(applied), jnp.float32),
        "spike": is_spike, "num_spikes": num_spikes, "finite": finite,
        "bad_reason": check.reason, "param_norm": check.param_norm,
        "prev_param_norm": check.prev_param_norm,
        "num_nonfinite": num_nonfinite, "loss_ema": loss_ema,
    }
    if collect_stats:
      metrics["max_logit_local"] = jnp.max(aux_A["max_logit_local"], axis=0)
      metrics["max_logit_global"] = jnp.max(aux_A["max_logit_global"], axis=0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                              loss_ema=loss_ema, num_spikes=num_spikes,
                              num_nonfinite=num_nonfinite)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, chunk_tokens: int = losses.DEFAULT_CHUNK_TOKENS):
  """`eval_step(params, model_rest, batch) -> {ce_sum, tokens, max_logit_*}` for one [B, T]
  batch; the host sums ce_sum and tokens over the validation set."""

  def eval_step(params, model_rest, batch):
    model = merge_model(graphdef, params, model_rest)
    h_BxTxD, _ = model(batch["inputs"], collect_stats=True, return_hidden=True)
    stats = nnx.pop(model, nnx.Intermediate)
    weights = batch.get("weights")
    if weights is None:
      weights = jnp.ones(batch["targets"].shape, jnp.float32)
    _, parts = losses.chunked_lm_loss(h_BxTxD, model.head_DxV, batch["targets"], weights,
                                      chunk_tokens=chunk_tokens)
    ce = parts["ce"]
    tokens = jnp.sum(weights)
    local_L, global_L = per_layer_max_logits(stats, model.config.num_layers)
    return {"ce_sum": ce * tokens, "tokens": tokens, "max_logit_local": local_L,
            "max_logit_global": global_L}

  return eval_step


def jit_train_step(train_step, state_shardings, batch_shardings, mesh):
  """jit with explicit shardings; the old state's buffers are donated (big_vision)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))
