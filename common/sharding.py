"""The one sharding module: the mesh, parameter/state shardings, and batch placement.

Mesh: always ("data", "fsdp", "tensor"), built by `make_mesh(data=-1, fsdp=1, tensor=1)` with
explicit `Auto` axis types, so GSPMD propagates shardings through the model and model code
carries no annotations.

Parameters and train state (big_vision: born sharded, never moved): `jax.eval_shape(init_fn)`
gives the abstract tree, `param_shardings` gives one NamedSharding per leaf, and
`create_sharded` runs `jax.jit(init_fn, out_shardings=...)` so every array is created in its
own shard. Rules are by NAME first (MaxText-style logical axes): a parameter path names one
logical axis per dimension (`PARAM_LOGICAL_AXES`), and logical axes map to mesh axes
(`LOGICAL_TO_MESH`): Megatron tensor parallelism splits q/k/v and gate/up over their outputs
(heads, hidden units), o and down over their inputs, the embedding and the LM head over the
vocabulary; FSDP splits the model dimension. A dimension that the mesh axis does not divide
stays whole. Leaves that no rule names (optimizer counts, rng, anything new) fall back to the
shape rule (`param_spec`): FSDP along the largest dimension `fsdp` divides, for leaves of
>= min_size elements. Optimizer moments carry their parameter's path, hence its sharding.

Batches: `put_batch` is the one way to place one. Each process passes its own slice of the
global batch (as `common.data` shards it) and `jax.make_array_from_process_local_data`
assembles the global array; with one process the local slice is the global batch. The batch
axis is split over `data` and `fsdp` together, as in big_vision's data x fsdp meshes.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over these; `tensor` holds whole rows
DEFAULT_MIN_SIZE = 2**14    # leaves smaller than this stay replicated (shape rule only)

# Parameter path (keys joined by "/") -> one logical axis per dimension. First match wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"embed_positions/embedding$", (None, "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"(q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"o_proj/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"(norm|layernorm|q_norm|k_norm)[^/]*/(weight|scale|bias)$", (None,)),
)
# Logical axis -> mesh axis (None or absent: not split).
LOGICAL_TO_MESH: dict[str, str | None] = {
    "vocab": "tensor", "heads": "tensor", "mlp": "tensor", "embed": "fsdp",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh over all devices; -1 on one axis takes the rest."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, v in sizes.items():
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v == 0 or v < -1:
      raise ValueError(f"mesh.{name}: got {v!r}; allowed: a positive int or -1")
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh: {data} x {fsdp} x {tensor} (data x fsdp x tensor); allowed: -1 on "
                     "at most one axis")
  n = jax.device_count()
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if n % known:
    raise ValueError(f"mesh.data x mesh.fsdp x mesh.tensor: {data} x {fsdp} x {tensor} does "
                     f"not divide the {n} devices")
  shape = tuple(int(v) if v != -1 else n // known for v in sizes.values())
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh.data x mesh.fsdp x mesh.tensor: {' x '.join(map(str, shape))} "
                     f"needs {int(np.prod(shape))} devices, have {n}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


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


def path_str(path) -> str:
  """A tree path as "a/b/0/c" (dict keys, attribute names and sequence indices)."""
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  if parts and parts[-1] == "value":   # an nnx.State leaf: the Variable's value field
    parts.pop()
  return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """The logical axes a parameter path names (None if no rule matches or ranks differ)."""
  for pattern, axes in PARAM_LOGICAL_AXES:
    if re.search(pattern, path) and len(axes) == ndim:
      return axes
  return None


def named_param_spec(path: str, shape, mesh, *, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """Name rule first (logical axes -> mesh axes, whole where the axis does not divide), shape
  rule otherwise."""
  shape = tuple(shape)
  axes = logical_axes(path, len(shape))
  if axes is None:
    return param_spec(shape, mesh, min_size=min_size)
  spec = []
  for size, logical in zip(shape, axes):
    mesh_axis = LOGICAL_TO_MESH.get(logical) if logical else None
    if mesh_axis == "fsdp" and int(np.prod(shape or (1,))) < min_size:
      mesh_axis = None   # small leaves: FSDP would cost more in gathers than it saves
    if mesh_axis is None or mesh_axis not in mesh.axis_names or mesh.shape[mesh_axis] == 1 \
        or size % mesh.shape[mesh_axis]:
      spec.append(None)
    else:
      spec.append(mesh_axis)
  return P(*spec)


def param_shardings(tree, mesh, *, min_size: int = DEFAULT_MIN_SIZE):
  """One NamedSharding per leaf of a tree of arrays or ShapeDtypeStructs (params, optimizer
  state, a whole TrainState: scalars and small leaves come out replicated)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, named_param_spec(path_str(path), x.shape, mesh,
                                                           min_size=min_size)), tree)


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
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


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
