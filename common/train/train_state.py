"""The trainer's whole mutable state as one pytree, so a step is `state -> state`.

Parameters are kept as a pure nested dict (`nnx.to_pure_dict`): it checkpoints with orbax
without NNX-specific handlers, and `nnx.merge(graphdef, params)` rebuilds the module inside
jitted functions (tunix style: split at the edges, plain jax inside). The loss-spike EMA and
the counters live here too, so a resumed run continues them bit-for-bit. GRPO uses the same
state with `ref_params` set (its frozen KL anchor); the LM leaves it None (an empty subtree,
so it costs nothing in jit or checkpoints).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.config import ModelConfig
from common.model import Decoder


@flax.struct.dataclass
class TrainState:
  """The one train state of both trainers (LM and GRPO); build it with `TrainState.create`."""
  step: jax.Array            # int32 []: number of train steps taken (skipped ones included)
  params: Any                # pure dict of float arrays (trainable)
  model_rest: Any            # pure dict of non-Param model state (usually empty)
  opt_state: Any             # optax state over `params`
  rng: jax.Array             # uint32 [2]: raw key data (orbax-friendly)
  loss_ema: jax.Array        # float32 []: EMA of the train loss; NaN until the first step
  num_spikes: jax.Array      # int32 []: steps whose loss exceeded the EMA by the threshold
  num_nonfinite: jax.Array   # int32 []: steps skipped for a non-finite loss / gradient
  ref_params: Any = None     # frozen reference policy (GRPO's KL anchor); None for the LM

  @classmethod
  def create(cls, *, params, optimizer: optax.GradientTransformation, seed: int,
             model_rest: Any = None, ref_params: Any = None) -> "TrainState":
    """Step 0: fresh optimizer state over `params`, rng from `seed`, counters at zero."""
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=optimizer.init(params),
               rng=jax.random.key_data(jax.random.key(seed)),
               model_rest={} if model_rest is None else model_rest,
               loss_ema=jnp.full((), jnp.nan, jnp.float32),
               num_spikes=jnp.zeros((), jnp.int32), num_nonfinite=jnp.zeros((), jnp.int32),
               ref_params=ref_params)


def model_graphdef(config: ModelConfig):
  """The static structure of the decoder, computed without allocating parameters."""
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return graphdef


def make_init_fn(config: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
  """A no-argument function building the initial TrainState (to run under jit, sharded)."""

  def init() -> TrainState:
    model = Decoder(config, rngs=nnx.Rngs(params=seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState.create(params=nnx.to_pure_dict(params), optimizer=optimizer,
                             seed=seed + 1, model_rest=nnx.to_pure_dict(rest))

  return init


def merge_model(graphdef, params, model_rest):
  """Pure dicts -> a live NNX Decoder (inside jit: traced arrays)."""
  if model_rest:
    return nnx.merge(graphdef, params, model_rest)
  return nnx.merge(graphdef, params)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
