"""The one sharding module: the mesh, parameter/state shardings, and batch placement.

Mesh: always ("data", "fsdp"), built by `make_mesh(data=-1, fsdp=1)` with explicit `Auto` axis
types, so GSPMD propagates shardings through the model and model code carries no annotations.

Parameters and train state (big_vision: born sharded, never moved): `jax.eval_shape(init_fn)`
gives the abstract tree, `param_shardings` gives one NamedSharding per leaf, and
`create_sharded` runs `jax.jit(init_fn, out_shardings=...)` so every array is created in its
own shard. The rules are by shape for now (`param_spec`): a leaf of >= min_size elements is
sharded FSDP-style along its largest dimension that the `fsdp` axis divides; everything else
(scalars, norms, rng) is replicated. Optimizer moments share their parameter's shape, hence
its sharding. Name-based tensor-parallel rules (MaxText logical axes) plug in at
`param_shardings`, the one place that turns a tree into shardings.

Batches: `put_batch` is the one way to place one. Each process passes its own slice of the
global batch (as `common.data` shards it) and `jax.make_array_from_process_local_data`
assembles the global array; with one process the local slice is the global batch. The batch
axis is split over `data` and `fsdp` together, as in big_vision's data x fsdp meshes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
DEFAULT_MIN_SIZE = 2**14    # leaves smaller than this stay replicated


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over all devices; -1 on one axis takes the remaining devices."""
  sizes = {"data": data, "fsdp": fsdp}
  for name, v in sizes.items():
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v == 0 or v < -1:
      raise ValueError(f"mesh.{name}: got {v!r}; allowed: a positive int or -1")
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.fsdp: got -1 with mesh.data=-1; allowed: -1 on at most one axis")
  n = jax.device_count()
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if n % known:
    raise ValueError(f"mesh.data x mesh.fsdp: {data} x {fsdp} does not divide the {n} devices")
  shape = tuple(int(v) if v != -1 else n // known for v in sizes.values())
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh.data x mesh.fsdp: {shape[0]} x {shape[1]} needs "
                     f"{int(np.prod(shape))} devices, have {n}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- parameters ---


def param_spec(shape, mesh, *, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """FSDP along the largest dim the fsdp axis divides, for leaves of >= min_size elements."""
  shape = tuple(shape)
  if "fsdp" not in mesh.axis_names or int(np.prod(shape or (1,))) < min_size:
    return P()
  n = mesh.shape["fsdp"]
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree, mesh, *, min_size: int = DEFAULT_MIN_SIZE):
  """One NamedSharding per leaf of a tree of arrays or ShapeDtypeStructs (params, optimizer
  state, a whole TrainState: scalars and small leaves come out replicated)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh, min_size=min_size)),
                      tree)


def shard_params(tree, mesh, *, min_size: int = DEFAULT_MIN_SIZE):
  """Moves an existing tree (e.g. a loaded checkpoint's params) onto `param_shardings`."""
  return jax.device_put(tree, param_shardings(tree, mesh, min_size=min_size))


def create_sharded(init_fn: Callable[[], Any], mesh, *, min_size: int = DEFAULT_MIN_SIZE):
  """Runs `init_fn` under jit so each output leaf is created in its own shard.

  Returns (tree, shardings)."""
  shardings = param_shardings(jax.eval_shape(init_fn), mesh, min_size=min_size)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings


# -------------------------------------------------------------------------------- batches ---


def batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in MESH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)] or [1]))


def batch_spec(mesh, ndim: int, *, leading: int = 0) -> P:
  """Axis `leading` (the batch axis) over data and fsdp; `leading` axes before it (e.g. the
  gradient-accumulation axis of [A, B, T] LM batches) and all later axes are whole."""
  if not 0 <= leading < ndim:
    raise ValueError(f"batch_spec: leading={leading} is not an axis of a {ndim}-d array")
  return P(*([None] * leading), batch_axes(mesh) or None, *([None] * (ndim - leading - 1)))


def batch_sharding(mesh, ndim: int, *, leading: int = 0) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh, ndim, leading=leading))


def put_batch(tree, mesh, *, leading: int = 0):
  """A pytree of batch arrays -> global arrays split over the batch axis `leading`.

  Host data (numpy, lists, or single-process jax arrays) is this process's slice of the
  global batch: `jax.make_array_from_process_local_data` concatenates the processes' slices
  (with one process the slice is the whole batch). A jax.Array that already spans several
  processes (e.g. a slice of a sharded rollout) is global already and is only resharded.
  """
  per_process = max(data_parallel_size(mesh) // jax.process_count(), 1)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, batch_sharding(mesh, x.ndim, leading=leading))
    if not isinstance(x, (jax.Array, np.ndarray)):
      x = np.asarray(x)
    if x.shape[leading] % per_process:
      raise ValueError(f"batch: {x.shape[leading]} rows per process on axis {leading} are not "
                       f"divisible by the per-process data-parallel size {per_process}")
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, x.ndim, leading=leading), x)

  return jax.tree.map(put, tree)
