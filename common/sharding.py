"""Mesh construction and sharding rules shared by the sampler and the trainers.

Rules are by shape, not by name, so they apply to any parameter tree: a parameter is
sharded FSDP-style along its largest dimension that the `fsdp` axis divides; everything
else is replicated. Batches are sharded along the leading axis over `data` (and `fsdp`
when present, as in big_vision's data x fsdp meshes).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(shape: Sequence[int] = (-1,), names: Sequence[str] = ("data",)):
  """`jax.make_mesh` with axis types given explicitly (Auto: GSPMD propagates shardings
  through the model, so model code needs no sharding annotations); -1 takes the rest."""
  shape = list(shape)
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one -1 in shape {shape}")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"make_mesh: shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {n}")
  return jax.make_mesh(tuple(shape), tuple(names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_spec(mesh, ndim: int) -> P:
  return P(batch_axes(mesh) or None, *([None] * (ndim - 1)))


def param_spec(shape, mesh, fsdp_axis: str = "fsdp", min_size: int = 2**14) -> P:
  if fsdp_axis not in mesh.axis_names or int(np.prod(shape or (1,))) < min_size:
    return P()
  n = mesh.shape[fsdp_axis]
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = fsdp_axis
      return P(*spec)
  return P()


def param_shardings(tree, mesh):
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), tree)


def shard_params(tree, mesh):
  return jax.device_put(tree, param_shardings(tree, mesh))


def shard_batch(tree, mesh):
  def put(x):
    axes = batch_axes(mesh)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if x.shape[0] % size:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by the mesh's "
                       f"data-parallel size {size}")
    return jax.device_put(x, NamedSharding(mesh, batch_spec(mesh, x.ndim)))
  return jax.tree.map(put, tree)
