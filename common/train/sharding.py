"""Mesh and sharding rules for training: a data x fsdp mesh, state born sharded.

Follows big_vision: the state is never materialized on one device and then moved.
`jax.eval_shape(init_fn)` gives its abstract shapes, shape-based FSDP rules (common.sharding)
give one NamedSharding per leaf, and `jax.jit(init_fn, out_shardings=...)` creates every
array directly in its shard.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from common import sharding as base_sharding

MESH_AXES = ("data", "fsdp")


def make_train_mesh(data: int = -1, fsdp: int = 1):
  """A ("data", "fsdp") mesh; -1 on one axis takes the remaining devices."""
  for name, v in (("data", data), ("fsdp", fsdp)):
    if v == 0 or v < -1:
      raise ValueError(f"mesh.{name} must be a positive int or -1, got {v}")
  return base_sharding.make_mesh((data, fsdp), MESH_AXES)


def leaf_spec(shape, mesh, min_size: int) -> P:
  """FSDP along the largest dim the fsdp axis divides, for leaves of >= min_size elements."""
  return base_sharding.param_spec(tuple(shape), mesh, fsdp_axis="fsdp", min_size=min_size)


def state_shardings(abstract_tree, mesh, *, min_size: int = 2**14):
  """One NamedSharding per leaf of an abstract (ShapeDtypeStruct) tree. Optimizer moments
  share their parameter's shape, hence its sharding; scalars are replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, mesh, min_size)),
                      abstract_tree)


def create_sharded(init_fn: Callable[[], Any], mesh, *, min_size: int = 2**14):
  """Runs `init_fn` under jit so each output leaf is created in its own shard.

  Returns (tree, shardings)."""
  abstract = jax.eval_shape(init_fn)
  shardings = state_shardings(abstract, mesh, min_size=min_size)
  tree = jax.jit(init_fn, out_shardings=shardings)()
  return tree, shardings


def batch_sharding(mesh, ndim: int, *, leading: int = 1) -> NamedSharding:
  """Batch arrays [A, B, ...] (A = gradient-accumulation micro-steps when leading=1):
  the B axis is split over data and fsdp together, as in big_vision's data x fsdp meshes."""
  spec = [None] * leading + [base_sharding.batch_axes(mesh) or None]
  spec += [None] * (ndim - leading - 1)
  return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in base_sharding.batch_axes(mesh)] or [1]))


def put_batch(batch: dict, mesh, *, leading: int = 1) -> dict:
  """This process's numpy batch -> global arrays sharded over the batch axis (with several
  processes, each passes its own slice of the global batch, as common.data shards it)."""
  size = data_parallel_size(mesh) // jax.process_count()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[leading] % max(size, 1):
      raise ValueError(f"batch field {k!r}: per-step batch {v.shape[leading]} is not divisible "
                       f"by the data-parallel size {size}")
    out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, v.ndim, leading=leading), v)
  return out
