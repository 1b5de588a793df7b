"""The LM trainer's wiring, built once from an `LMConfig`: model config, optimizer, mesh,
state initialiser and shardings, batch shardings and the jitted train step.

`common.train.loop` trains with it; `experiments.bench_memory` measures the same step with it,
so the benchmark cannot drift from what the trainer runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from common import sharding
from common.config import ModelConfig
from common.train import lm_step, train_state
from common.train.lm_config import LMConfig

BATCH_KEYS = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class LMSetup:
  config: LMConfig
  model_config: ModelConfig
  tx: optax.GradientTransformation
  schedule: Callable
  mesh: jax.sharding.Mesh
  graphdef: Any
  init_fn: Callable[[], Any]              # () -> TrainState (jit it with state_shardings)
  state_shardings: Any
  abstract_state: Any                     # ShapeDtypeStructs carrying state_shardings
  batch_shardings: dict[str, Any]         # {"inputs", "targets"}: [grad_accum, batch, seq]

  def train_step(self, *, collect_stats: bool):
    """The jitted step (state, batch) -> (state, metrics); `collect_stats` adds the attention
    statistics pass (the loop compiles both and uses the stats one on logging steps)."""
    c = self.config
    return lm_step.jit_train_step(
        lm_step.make_train_step(self.graphdef, self.tx, self.schedule, c.step,
                                collect_stats=collect_stats,
                                max_param_norm_ratio=c.loop.max_param_norm_ratio),
        self.state_shardings, self.batch_shardings, self.mesh)

  def batch_spec(self, micro_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract batch of the step (for `.lower(...)`), optionally at another micro-batch."""
    d = self.config.data
    shape = (d.grad_accum, d.batch_size if micro_batch is None else micro_batch, d.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
            for k, s in self.batch_shardings.items()}

  def init_state(self):
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)()


def build(c: LMConfig, vocab_size: int) -> LMSetup:
  """Everything the step needs, no data and no workdir. Raises ValueError (one line) when the
  micro-batch does not divide over the mesh's data-parallel size."""
  mcfg = c.model_config(vocab_size)
  tx, schedule = c.make_optimizer()
  mesh = sharding.make_mesh(c.mesh.mesh_data, c.mesh.mesh_fsdp, c.mesh.mesh_tensor)
  dp = sharding.data_parallel_size(mesh)
  if c.data.batch_size % dp:
    raise ValueError(f"data.batch_size: {c.data.batch_size} is not divisible by the mesh's "
                     f"data-parallel size {dp}; allowed: a multiple of {dp}")
  init_fn = train_state.make_init_fn(mcfg, tx, c.seed)
  abstract = jax.eval_shape(init_fn)
  state_sh = sharding.param_shardings(abstract, mesh, min_size=c.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  batch_sh = {k: sharding.batch_sharding(mesh, 3, leading=1) for k in BATCH_KEYS}
  return LMSetup(c, mcfg, tx, schedule, mesh, train_state.model_graphdef(mcfg), init_fn,
                 state_sh, abstract, batch_sh)
