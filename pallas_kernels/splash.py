"""LS-attention on TPU through jax's splash attention (Pallas/Mosaic TPU).

Local heads [0, num_local_heads) use `LocalMask((T, T), (window - 1, 0), 0)`:
query i sees key j iff i - (window - 1) <= j <= i, the LS-attention window
(arXiv 2505.15548). Global heads use `CausalMask((T, T))`. They are TWO
separate splash kernels on purpose: splash shrinks its key grid from the
per-block mask structure, and one `MultiHeadMask` that mixes local and causal
heads gives every head the union's (causal) key range, so the local heads would
lose their O(T * window) cost. Two calls also let each group have its own
blocks (`group_blocks`): local heads a key block near the window (splash skips
whole blocks only, so a 512 block around a 128 window computes ~4x too much);
global heads 512 blocks, with splash's fused backward when the number of key
blocks is small (its dq partials cost (T / block) x the size of q).

Left padding (`start_B`): segment ids. Row b's positions >= start_B[b] get id
1, the padding id 0, so real queries never see padding keys. Padding queries
see only padding keys (never an empty row, which splash does not allow), and
their outputs are then set to 0, so their cotangent is 0 and they add nothing
to dq, dk or dv: the gradients are exact.

Statistics (`return_stats=True`): the lse comes from splash's own forward
residual (a custom_vjp around splash that keeps the lse it saves for the
backward, and calls splash's backward with it: no second pass), max |logit|
from `tpu_max_logit.max_abs_logit`, a small kernel over the visible blocks.
Neither adds an XLA score pass. Splash's backward entry point
`_splash_attention_bwd` is private jax API (checked against jax 0.10.2 by the
tests here).

Layout: splash works per batch element on [H, T, D] and does not scale q, so
q is multiplied by 1/sqrt(D) here; the batch axis is a `jax.vmap`. Its soft-cap
`attn_logits_soft_cap` is applied to the scaled logits, as in the GPU kernel.

GQA: splash's MHA kernel accepts k/v with KVH heads when H % KVH == 0 (query
head h reads kv head h // (H / KVH)). Each call therefore gets the kv heads of
its own query heads when `num_local_heads` is a multiple of the group size;
otherwise one kv head serves both local and global query heads and k/v are
repeated to H heads first (memory cost, same result). KVH == 1 uses the MQA
kernel (`make_splash_mqa`, k/v [T, D]) for both calls.

T is zero-padded to a multiple of the largest block: padded keys are in the
future of every real query, so no real row sees them; padded rows are sliced
off.

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
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec as P

from common.sharding import batch_axes
from pallas_kernels.tpu_max_logit import max_abs_logit

_SPLASH_BLOCK = 128  # splash needs blocks that are multiples of 128
_BLOCK_CHOICES = (128, 256, 512)
_MAX_FUSED_KV_BLOCKS = 16  # fused bwd keeps (T / block_kv) partial dq copies


def group_blocks(t: int, window: int | None, *, block_q=None, block_kv=None):
  """(block_q, block_kv) for one head group; None fields are chosen here.

  Local (window given): the smallest of 128/256/512 that covers the window for both (a
  query block then reads ~2 key blocks). Global: 512, or less when T itself is shorter.
  """
  t128 = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
  if window is None:
    auto = max(b for b in _BLOCK_CHOICES if b <= max(t128, 128))
    auto = min(auto, 512)
  else:
    auto = next((b for b in _BLOCK_CHOICES if b >= window), _BLOCK_CHOICES[-1])
    auto = min(auto, max(b for b in _BLOCK_CHOICES if b <= t128))
  return block_q or auto, block_kv or auto


def _make_kernel(mask, *, mqa: bool, block_q: int, block_kv: int, fused_bwd: bool, soft_cap,
                 interpret, save_residuals=False):
  bwd = (dict(use_fused_bwd_kernel=True) if fused_bwd else
         dict(block_q_dq=block_q, block_kv_dq=block_kv))
  block_sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, **bwd)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  return make(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
              attn_logits_soft_cap=soft_cap, interpret=interpret,
              save_residuals=save_residuals)


def _collapse(mask_info):
  # What splash's `_splash_attention` does before its custom_vjp.
  if mask_info is None or mask_info.partial_mask_blocks is None:
    return mask_info
  blocks = mask_info.partial_mask_blocks
  return mask_info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _with_lse(kernel):
  """(q, k, v, segment_ids) -> (out, lse [H, T]), differentiable in out.

  `kernel` is made with save_residuals=True: its forward already returns the lse it keeps
  for the backward; this custom_vjp returns it too and runs splash's backward itself.
  """
  kw = kernel.kwargs

  @jax.custom_vjp
  def attend(q, k, v, seg):
    out, (lse,) = kernel(q, k, v, segment_ids=seg)
    return out, lse

  def fwd(q, k, v, seg):
    out, (lse,) = kernel(q, k, v, segment_ids=seg)
    return (out, lse), (q, k, v, seg, out, lse)

  def bwd(res, cts):
    q, k, v, seg, out, lse = res
    grads = _sk._splash_attention_bwd(  # pylint: disable=protected-access
        False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
        kw["attn_logits_soft_cap"], kw["interpret"],
        (q, k, v, seg, None, out, lse, _collapse(kernel.dq_mask_info),
         _collapse(kernel.dkv_mask_info)), cts[0])
    dseg = None if seg is None else jax.tree.map(
        lambda x: np.zeros(x.shape, jax.dtypes.float0), seg)
    return grads[3], grads[4], grads[5], dseg

  attend.defvjp(fwd, bwd)
  return attend


def _group_call(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, seg_q_BxT, mask, *, soft_cap, interpret,
                block_q, block_kv, fused_bwd, with_lse):
  """One splash kernel over a head group; kv heads already match the group.

  Returns out [B, H, T, D] and, if with_lse, lse [B, H, T]."""
  mqa = k_BxKxTxD.shape[1] == 1
  kernel = _make_kernel(mask, mqa=mqa, block_q=block_q, block_kv=block_kv,
                        fused_bwd=fused_bwd, soft_cap=soft_cap, interpret=interpret,
                        save_residuals=with_lse)
  if mqa:
    k_BxKxTxD, v_BxKxTxD = k_BxKxTxD[:, 0], v_BxKxTxD[:, 0]
  call = _with_lse(kernel) if with_lse else (lambda q, k, v, seg: (kernel(q, k, v, seg), None))

  def one(q, k, v, seg_q):
    seg = None if seg_q is None else splash.SegmentIds(q=seg_q, kv=seg_q)
    return call(q, k, v, seg)

  args = (q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, seg_q_BxT)
  if isinstance(interpret, bool):
    # vmap adds the batch as a leading grid axis of the pallas_call.
    return jax.vmap(one)(*args)
  # With pltpu.InterpretParams, vmap of the pallas_call fails in jax 0.10.2
  # (the TPU interpreter zips the 4-axis batched grid with the kernel's 3
  # dimension semantics: "safe_zip() argument 1 has length 3 but argument 0
  # has length 4"), so loop over the batch instead.
  return jax.lax.map(lambda a: one(*a), args)


def _ls_splash_unsharded(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, start_B, *, num_local_heads,
                         window, logits_soft_cap, return_stats, interpret, tpu_local_block_q,
                         tpu_local_block_kv, tpu_global_block):
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxTxKxD.shape[2]
  group = h // kvh
  nl = num_local_heads
  if window is not None and window >= t:
    window = t  # the window covers every causal key: same mask, smaller blocks stay valid
  local_blocks = group_blocks(t, window, block_q=tpu_local_block_q,
                              block_kv=tpu_local_block_kv)
  global_blocks = group_blocks(t, None, block_q=tpu_global_block, block_kv=tpu_global_block)
  used = ([local_blocks] if nl > 0 else []) + ([global_blocks] if nl < h else [])
  tile = math.lcm(*(x for blocks in used for x in blocks))
  tp = -(-t // tile) * tile
  pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
  # Splash does not scale the logits; fold 1/sqrt(D) into q.
  q = (q_BxTxHxD.astype(jnp.float32) / math.sqrt(d)).astype(q_BxTxHxD.dtype)
  q_BxHxTxD = jnp.pad(q, pad).transpose(0, 2, 1, 3)
  k_BxKxTxD = jnp.pad(k_BxTxKxD, pad).transpose(0, 2, 1, 3)
  v_BxKxTxD = jnp.pad(v_BxTxKxD, pad).transpose(0, 2, 1, 3)
  if kvh > 1 and nl % group:
    # A kv head is shared by a local and a global query head: repeat to H.
    k_BxKxTxD = jnp.repeat(k_BxKxTxD, group, axis=1)
    v_BxKxTxD = jnp.repeat(v_BxKxTxD, group, axis=1)
    group = 1
  seg_BxTp = start = None
  if start_B is not None:
    start = jnp.clip(jnp.asarray(start_B, jnp.int32), 0, t)
    seg_BxTp = (jnp.arange(tp)[None, :] >= start[:, None]).astype(jnp.int32)

  def kv_heads(lo, hi):
    if k_BxKxTxD.shape[1] == 1:  # MQA: every query head reads kv head 0
      return k_BxKxTxD, v_BxKxTxD
    return k_BxKxTxD[:, lo // group:hi // group], v_BxKxTxD[:, lo // group:hi // group]

  outs, lses, amaxs = [], [], []
  for lo, hi, w, (bq, bkv) in ((0, nl, window, local_blocks), (nl, h, None, global_blocks)):
    if hi <= lo:
      continue
    if w is None:
      mask = splash.MultiHeadMask([splash.CausalMask((tp, tp))] * (hi - lo))
    else:
      mask = splash.MultiHeadMask([splash.LocalMask((tp, tp), (w - 1, 0), 0)] * (hi - lo))
    fused = w is None and tp // bkv <= _MAX_FUSED_KV_BLOCKS
    kg, vg = kv_heads(lo, hi)
    out, lse = _group_call(q_BxHxTxD[:, lo:hi], kg, vg, seg_BxTp, mask,
                           soft_cap=logits_soft_cap, interpret=interpret, block_q=bq,
                           block_kv=bkv, fused_bwd=fused, with_lse=return_stats)
    outs.append(out)
    if return_stats:
      lses.append(lse)
      amaxs.append(max_abs_logit(
          jax.lax.stop_gradient(q_BxHxTxD[:, lo:hi]), jax.lax.stop_gradient(kg),
          jnp.zeros((b,), jnp.int32) if start is None else start,
          window=None if w is None or w >= t else w, soft_cap=logits_soft_cap,
          block_q=bq, block_k=bkv, interpret=bool(interpret)))
  out_BxHxTxD = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
  out_BxTxHxD = out_BxHxTxD.transpose(0, 2, 1, 3)[:, :t]
  if start is not None:
    # Padding rows attended to padding keys (segment 0): their output is 0.
    row_ok_BxT = jnp.arange(t)[None, :] >= start[:, None]
    out_BxTxHxD = jnp.where(row_ok_BxT[:, :, None, None], out_BxTxHxD, 0)
  out_BxTxHxD = out_BxTxHxD.astype(q_BxTxHxD.dtype)
  if not return_stats:
    return out_BxTxHxD
  cat = lambda xs: jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
  lse_BxHxT = jax.lax.stop_gradient(cat(lses)[:, :, :t])
  amax_BxHxT = cat(amaxs)[:, :, :t]
  return out_BxTxHxD, lse_BxHxT, amax_BxHxT


def ls_attention_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    start_B: jax.Array | None = None,
    *,
    num_local_heads: int,
    window: int,
    logits_soft_cap: float | None = None,
    return_stats: bool = False,
    tpu_local_block_q: int | None = None,
    tpu_local_block_kv: int | None = None,
    tpu_global_block: int | None = None,
    interpret=False,
    mesh: jax.sharding.Mesh | None = None,
):
  """LS-attention via splash attention (TPU; `interpret` runs it on CPU).

  Args:
    q: [B, T, H, D]; k, v: [B, T, KVH, D] with H % KVH == 0.
    start_B: optional int [B]; keys before start_B[b] are masked (left padding); rows that
      see no key output 0.
    num_local_heads: heads [0, num_local_heads) are local, the rest causal.
    window: local heads see keys i - window < j <= i.
    logits_soft_cap: optional cap * tanh(logits / cap).
    return_stats: also return lse and max |logit| per row ([B, H, T] float32, no gradient;
      rows before start_B[b] hold meaningless values).
    tpu_local_block_q, tpu_local_block_kv, tpu_global_block: splash blocks per head group
      (multiples of 128); None = `group_blocks`' choice.
    interpret: False, True, or a `pltpu.InterpretParams()` (simulates TPU
      memory semantics on CPU).
    mesh: if given, shard the batch axis over its `data`/`fsdp` axes with
      `jax.shard_map`.

  Returns:
    out [B, T, H, D] in q.dtype (differentiable, splash's own backward), or
    (out, lse, max_abs_logit) with return_stats.
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
  for name, blk in (("tpu_local_block_q", tpu_local_block_q),
                    ("tpu_local_block_kv", tpu_local_block_kv),
                    ("tpu_global_block", tpu_global_block)):
    if blk is not None and (blk < _SPLASH_BLOCK or blk % _SPLASH_BLOCK):
      raise ValueError(f"{name} must be None or a multiple of {_SPLASH_BLOCK}; got {blk!r}")
  if start_B is not None and tuple(jnp.shape(start_B)) != (q.shape[0],):
    raise ValueError(f"start_B must have shape [B]=({q.shape[0]},); got "
                     f"{tuple(jnp.shape(start_B))}")
  window = None if window is None else int(window)
  fn = functools.partial(
      _ls_splash_unsharded, num_local_heads=num_local_heads, window=window,
      logits_soft_cap=logits_soft_cap, return_stats=return_stats, interpret=interpret,
      tpu_local_block_q=tpu_local_block_q, tpu_local_block_kv=tpu_local_block_kv,
      tpu_global_block=tpu_global_block)
  if mesh is None:
    return fn(q, k, v, start_B)
  axes = batch_axes(mesh)
  if not axes:
    raise ValueError(f"mesh must have a 'data' or 'fsdp' axis to shard the "
                     f"batch over; got axes {mesh.axis_names}")
  shards = math.prod(mesh.shape[a] for a in axes)
  if q.shape[0] % shards:
    raise ValueError(f"batch size {q.shape[0]} must be divisible by the "
                     f"{shards} devices of mesh axes {axes}")
  spec = P(axes, None, None, None)
  stat_spec = P(axes, None, None)
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  if explicit & set(axes):
    # Explicit axes: shard_map wants inputs that already carry the in_specs
    # sharding (Auto axes are resharded by shard_map itself).
    q, k, v = (jax.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
  out_specs = (spec, stat_spec, stat_spec) if return_stats else spec
  if start_B is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh,
                         in_specs=(spec, spec, spec), out_specs=out_specs,
                         check_vma=False)(q, k, v)
  start_B = jnp.asarray(start_B, jnp.int32)
  if explicit & set(axes):
    start_B = jax.reshard(start_B, NamedSharding(mesh, P(axes)))
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(axes)),
                       out_specs=out_specs, check_vma=False)(q, k, v, start_B)
