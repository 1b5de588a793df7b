"""LS-attention on TPU through jax's splash attention (Pallas/Mosaic TPU).

Local heads [0, num_local_heads) use `LocalMask((T, T), (window - 1, 0), 0)`:
query i sees key j iff i - (window - 1) <= j <= i, the LS-attention window
(arXiv 2505.15548). Global heads use `CausalMask((T, T))`. They are TWO
separate splash kernels on purpose: splash shrinks its key grid from the
per-block mask structure, and one `MultiHeadMask` that mixes local and causal
heads gives every head the union's (causal) key range, so the local heads would
lose their O(T * window) cost.

Layout: splash works per batch element on [H, T, D] and does not scale q, so
q is multiplied by 1/sqrt(D) here; the batch axis is a `jax.vmap`. Its soft-cap
`attn_logits_soft_cap` is applied to the scaled logits, as in the GPU kernel.

GQA: splash's MHA kernel accepts k/v with KVH heads when H % KVH == 0 (query
head h reads kv head h // (H / KVH)). Each call therefore gets the kv heads of
its own query heads when `num_local_heads` is a multiple of the group size;
otherwise one kv head serves both local and global query heads and k/v are
repeated to H heads first (memory cost, same result). KVH == 1 uses the MQA
kernel (`make_splash_mqa`, k/v [T, D]) for both calls.

T is zero-padded to a multiple of the splash block (128): padded keys are in
the future of every real query, so no real row sees them; padded rows are
sliced off.

Sharding: with `mesh`, the computation runs under `jax.shard_map` with the
batch axis split over the mesh's batch axes (`data`, `fsdp` when present, as
`common.sharding.batch_axes`); heads and sequence stay whole on each device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec as P

from common.sharding import batch_axes

_SPLASH_BLOCK = 128  # splash needs kv compute blocks that are multiples of 128


def _make_kernel(mask, *, mqa: bool, block: int, soft_cap, interpret):
  block_sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  return make(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
              attn_logits_soft_cap=soft_cap, interpret=interpret)


def _group_call(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, mask, *, soft_cap, interpret,
                block):
  """One splash kernel over a head group; kv heads already match the group."""
  mqa = k_BxKxTxD.shape[1] == 1
  kernel = _make_kernel(mask, mqa=mqa, block=block, soft_cap=soft_cap,
                        interpret=interpret)
  if mqa:
    k_BxKxTxD, v_BxKxTxD = k_BxKxTxD[:, 0], v_BxKxTxD[:, 0]
  if isinstance(interpret, bool):
    # vmap adds the batch as a leading grid axis of the pallas_call.
    return jax.vmap(kernel)(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD)
  # With pltpu.InterpretParams, vmap of the pallas_call fails in jax 0.10.2
  # (the TPU interpreter zips the 4-axis batched grid with the kernel's 3
  # dimension semantics: "safe_zip() argument 1 has length 3 but argument 0
  # has length 4"), so loop over the batch instead.
  return jax.lax.map(lambda qkv: kernel(*qkv),
                     (q_BxHxTxD, k_BxKxTxD, v_BxKxTxD))


def _ls_splash_unsharded(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, *, num_local_heads,
                         window, logits_soft_cap, interpret):
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxTxKxD.shape[2]
  group = h // kvh
  tp = math.ceil(t / _SPLASH_BLOCK) * _SPLASH_BLOCK
  pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
  # Splash does not scale the logits; fold 1/sqrt(D) into q.
  q = (q_BxTxHxD.astype(jnp.float32) / math.sqrt(d)).astype(q_BxTxHxD.dtype)
  q_BxHxTxD = jnp.pad(q, pad).transpose(0, 2, 1, 3)
  k_BxKxTxD = jnp.pad(k_BxTxKxD, pad).transpose(0, 2, 1, 3)
  v_BxKxTxD = jnp.pad(v_BxTxKxD, pad).transpose(0, 2, 1, 3)
  if kvh > 1 and num_local_heads % group:
    # A kv head is shared by a local and a global query head: repeat to H.
    k_BxKxTxD = jnp.repeat(k_BxKxTxD, group, axis=1)
    v_BxKxTxD = jnp.repeat(v_BxKxTxD, group, axis=1)
    group = 1

  def kv_heads(lo, hi):
    if k_BxKxTxD.shape[1] == 1:  # MQA: every query head reads kv head 0
      return k_BxKxTxD, v_BxKxTxD
    return k_BxKxTxD[:, lo // group:hi // group], v_BxKxTxD[:, lo // group:hi // group]

  call = functools.partial(_group_call, soft_cap=logits_soft_cap,
                           interpret=interpret, block=_SPLASH_BLOCK)
  outs = []
  nl = num_local_heads
  if nl > 0:
    mask = splash.MultiHeadMask(
        [splash.LocalMask((tp, tp), (window - 1, 0), 0)] * nl)
    outs.append(call(q_BxHxTxD[:, :nl], *kv_heads(0, nl), mask))
  if nl < h:
    mask = splash.MultiHeadMask([splash.CausalMask((tp, tp))] * (h - nl))
    outs.append(call(q_BxHxTxD[:, nl:], *kv_heads(nl, h), mask))
  out_BxHxTxD = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
  return out_BxHxTxD.transpose(0, 2, 1, 3)[:, :t].astype(q_BxTxHxD.dtype)


def ls_attention_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_local_heads: int,
    window: int,
    logits_soft_cap: float | None = None,
    interpret=False,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
  """LS-attention via splash attention (TPU; `interpret` runs it on CPU).

  Args:
    q: [B, T, H, D]; k, v: [B, T, KVH, D] with H % KVH == 0.
    num_local_heads: heads [0, num_local_heads) are local, the rest causal.
    window: local heads see keys i - window < j <= i.
    logits_soft_cap: optional cap * tanh(logits / cap).
    interpret: False, True, or a `pltpu.InterpretParams()` (simulates TPU
      memory semantics on CPU).
    mesh: if given, shard the batch axis over its `data`/`fsdp` axes with
      `jax.shard_map`.

  Returns:
    out [B, T, H, D] in q.dtype. Differentiable (splash's own backward).
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"q must be [B,T,H,D] and k, v [B,T,KVH,D] of equal "
                     f"shape; got q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k/v must share B, T and head dim; got q "
                     f"{q.shape}, k {k.shape}")
  h, kvh = q.shape[2], k.shape[2]
  if h % kvh:
    raise ValueError(f"num query heads H={h} must be a multiple of KVH={kvh}")
  if not 0 <= num_local_heads <= h:
    raise ValueError(f"num_local_heads must be in [0, {h}]; got "
                     f"{num_local_heads}")
  if num_local_heads > 0 and (not isinstance(window, (int, np.integer))
                              or isinstance(window, bool) or window < 1):
    raise ValueError(f"window must be an int >= 1; got {window!r}")
  window = None if window is None else int(window)
  fn = functools.partial(
      _ls_splash_unsharded, num_local_heads=num_local_heads, window=window,
      logits_soft_cap=logits_soft_cap, interpret=interpret)
  if mesh is None:
    return fn(q, k, v)
  axes = batch_axes(mesh)
  if not axes:
    raise ValueError(f"mesh must have a 'data' or 'fsdp' axis to shard the "
                     f"batch over; got axes {mesh.axis_names}")
  shards = math.prod(mesh.shape[a] for a in axes)
  if q.shape[0] % shards:
    raise ValueError(f"batch size {q.shape[0]} must be divisible by the "
                     f"{shards} devices of mesh axes {axes}")
  spec = P(axes, None, None, None)
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  if explicit & set(axes):
    # Explicit axes: shard_map wants inputs that already carry the in_specs
    # sharding (Auto axes are resharded by shard_map itself).
    q, k, v = (jax.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec),
                       out_specs=spec, check_vma=False)(q, k, v)
