"""`ls_attention`: the LS-attention functional op (arXiv 2505.15548) and its dispatch.

One function, several implementations held together by the tests:
  reference        dense masked softmax, float32 (ls_attention/reference.py)
  xla              blocked, O(T*window) for local heads (ls_attention/xla.py); CPU default
  pallas           windowed flash-attention Pallas kernel, one launch for all heads, left padding
                   and stats inside (pallas_kernels/windowed_flash.py); GPU
  splash           jax splash attention, one call per head group, padding by segment ids
                   (pallas_kernels/splash.py); TPU
  auto             cpu -> xla, gpu -> pallas, tpu -> splash
`interpret=True` runs the Pallas paths in interpret mode (CPU tests). Kernels are imported
lazily, so a missing or broken kernel never affects the xla path. `block_sizes` (a
`BlockSizes`) sets the kernels' tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ls_attention import xla as xla_impl
from ls_attention.block_sizes import BlockSizes
from ls_attention.reference import ls_attention_reference

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas", "splash")
_AUTO = {"cpu": "xla", "gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "splash"}


def resolve_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return _AUTO.get(jax.default_backend(), "xla")
  return implementation


def validate(q_shape, k_shape, v_shape, num_local_heads, window, logits_soft_cap=None):
  """Boundary checks shared by the op, the cache and the modules."""
  if len(q_shape) != 4:
    raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q_shape)}")
  if len(k_shape) != 4:
    raise ValueError(f"k must be [B, S, KVH, D], got shape {tuple(k_shape)}")
  if tuple(v_shape) != tuple(k_shape):
    raise ValueError(f"v shape {tuple(v_shape)} must equal k shape {tuple(k_shape)}")
  b, t, h, d = q_shape
  if k_shape[0] != b:
    raise ValueError(f"k/v batch {k_shape[0]} must equal q batch {b}")
  if k_shape[3] != d:
    raise ValueError(f"head dim mismatch: q has D={d}, k/v have D={k_shape[3]}")
  if k_shape[1] < t:
    raise ValueError(f"k/v length S={k_shape[1]} must be >= q length T={t}")
  if h % k_shape[2]:
    raise ValueError(f"H % KVH != 0: q heads H={h} must be a multiple of k/v heads "
                     f"KVH={k_shape[2]}")
  if isinstance(num_local_heads, bool) or not isinstance(num_local_heads, (int, np.integer)) \
      or not 0 <= num_local_heads <= h:
    raise ValueError(f"num_local_heads must be an int in [0, H={h}], got {num_local_heads!r}")
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap!r}")


def split_kv(k_BxSxKxD, h0: int, h1: int, g: int):
  """K/V heads serving query heads [h0, h1) and the GQA group size to use with them.

  If the group boundary cuts through a KV head (e.g. 11 local of 12 query heads with G=2),
  the KV heads are gathered per query head (group size 1): exact, costs only K/V memory.
  """
  if h0 % g == 0 and h1 % g == 0:
    return k_BxSxKxD[:, :, h0 // g:h1 // g], g
  return k_BxSxKxD[:, :, np.arange(h0, h1) // g], 1


def band_chunk(window: int) -> int:
  """Query chunk of the band path: C = window, so each chunk reads itself + one previous.

  Measured on the 2-core CPU at T=4096, w=100: C in {50, 64, 100} within noise of each other
  (C=100 best in the last run), C >= 128 slower.
  """
  return max(16, window)


def _use_band(t: int, window: int) -> bool:
  c = band_chunk(window)
  return (-(-(window - 1) // c) + 1) * c * 2 <= t


def _prefix_blocks(t: int) -> int:
  # ~512-row blocks keep a block's scores cache-friendly and skip most of the masked upper
  # triangle; measured faster than 1k-row blocks at T=1024 and T=4096 on the 2-core CPU.
  return max(1, min(16, t // 512))


def _group_xla(q, k, v, *, window, logits_soft_cap, start_B, need_stats):
  """One head group through the xla building blocks. window=None: causal (global)."""
  t = q.shape[1]
  if window is not None and window >= k.shape[1]:
    window = None  # the window covers every key: plain causal
  if window is not None and _use_band(t, window):
    return xla_impl.band_attention(q, k, v, window=window, chunk=band_chunk(window),
                                   logits_soft_cap=logits_soft_cap, start_B=start_B,
                                   need_stats=need_stats)
  return xla_impl.prefix_attention(q, k, v, window=window, num_blocks=_prefix_blocks(t),
                                   logits_soft_cap=logits_soft_cap, start_B=start_B,
                                   need_stats=need_stats)


def _row_valid_BxT(b, t, s, start_B):
  if start_B is None:
    return jnp.ones((b, t), bool)
  return (np.arange(s - t, s)[None, :] >= jnp.maximum(jnp.asarray(start_B), 0)[:, None])


def _stats(groups, row_valid_BxT):
  """groups: {"local"/"global": (lse_BxHxT, maxabs_BxHxT) or None} -> scalar stats."""
  out = {}
  for name in ("local", "global"):
    if groups.get(name) is None:
      out[f"{name}_max_abs_logit"] = jnp.zeros((), jnp.float32)
      out[f"{name}_mean_lse"] = jnp.zeros((), jnp.float32)
      continue
    lse, maxabs = groups[name]
    valid = jnp.broadcast_to(row_valid_BxT[:, None, :], lse.shape)
    out[f"{name}_max_abs_logit"] = jnp.max(jnp.where(valid, maxabs, 0.0)).astype(jnp.float32)
    out[f"{name}_mean_lse"] = (jnp.sum(jnp.where(valid, lse, 0.0)) /
                               jnp.maximum(jnp.sum(valid), 1)).astype(jnp.float32)
  return out


def _ls_attention_grouped(q, k, v, *, num_local_heads, window, logits_soft_cap, start_B,
                          return_stats, group_fn):
  """Splits heads into the local and global group, runs group_fn on each, concatenates."""
  b, t, h, _ = q.shape
  g = h // k.shape[2]
  outs, stats = [], {}
  for name, lo, hi, w in (("local", 0, num_local_heads, window),
                          ("global", num_local_heads, h, None)):
    if hi <= lo:
      continue
    kg, _ = split_kv(k, lo, hi, g)
    vg, _ = split_kv(v, lo, hi, g)
    o, lse, maxabs = group_fn(q[:, :, lo:hi], kg, vg, window=w,
                              logits_soft_cap=logits_soft_cap, start_B=start_B,
                              need_stats=return_stats)
    outs.append(o)
    stats[name] = (lse, maxabs) if return_stats else None
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  if not return_stats:
    return out
  return out, _stats(stats, _row_valid_BxT(b, t, k.shape[1], start_B))


def _kernel_stats(lse_BxHxT, amax_BxHxT, num_local_heads, row_valid_BxT):
  nl = num_local_heads
  h = lse_BxHxT.shape[1]
  groups = {"local": (lse_BxHxT[:, :nl], amax_BxHxT[:, :nl]) if nl > 0 else None,
            "global": (lse_BxHxT[:, nl:], amax_BxHxT[:, nl:]) if nl < h else None}
  return jax.lax.stop_gradient(_stats(groups, row_valid_BxT))


def _kernel_call(impl, q, k, v, *, num_local_heads, window, logits_soft_cap, return_stats,
                 start_B, interpret, blocks: BlockSizes):
  """One kernel call over all heads; padding and statistics handled inside the kernels."""
  if impl == "pallas":
    from pallas_kernels.windowed_flash import windowed_flash_attention  # lazy: optional kernel
    res = windowed_flash_attention(q, k, v, start_B, window=window,
                                   num_local_heads=num_local_heads,
                                   logits_soft_cap=logits_soft_cap, return_stats=return_stats,
                                   interpret=interpret, **blocks.gpu_kwargs())
  else:  # splash
    from pallas_kernels.splash import ls_attention_splash  # lazy: optional kernel
    res = ls_attention_splash(q, k, v, start_B, num_local_heads=num_local_heads, window=window,
                              logits_soft_cap=logits_soft_cap, return_stats=return_stats,
                              interpret=interpret, **blocks.tpu_kwargs())
  if not return_stats:
    return res
  out, lse, amax = res
  b, t = q.shape[:2]
  return out, _kernel_stats(lse, amax, num_local_heads, _row_valid_BxT(b, t, t, start_B))


def ls_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, num_local_heads: int, window: int,
                 implementation: str = "auto", logits_soft_cap: float | None = None,
                 return_stats: bool = False, start_B=None, interpret: bool = False,
                 block_sizes: BlockSizes | dict | None = None):
  """LS-attention: heads [0, num_local_heads) local (window), the rest global (causal).

  Args:
    q_BxTxHxD: queries. k_BxSxKxD, v_BxSxKxD: keys/values, H % KVH == 0 (GQA/MQA). S >= T;
      query i sits at key position i + S - T (S == T for plain self-attention).
    num_local_heads: in [0, H]; 0 is causal MHSA, H is all-local.
    window: >= 1; a local query i sees key j iff i - window < j <= i (includes itself).
    implementation: one of IMPLEMENTATIONS.
    logits_soft_cap: if set, logits -> cap * tanh(logits / cap) before the softmax.
    return_stats: also return {local,global}_{max_abs_logit,mean_lse} (scalars, float32).
      The kernels compute them in the same pass (GPU) or from splash's residual plus a
      small max |logit| kernel (TPU); ask only on steps that log them.
    start_B: optional int [B]; keys at positions < start_B[b] are masked (left padding).
      Rows that see no key output 0 and are left out of the stats. The kernels mask it
      themselves (no fallback).
    interpret: run the Pallas kernels in interpret mode (for CPU tests).
    block_sizes: kernel tiles (`BlockSizes` or a dict of its fields); None = defaults.
  Returns:
    out [B, T, H, D] in q's dtype, or (out, stats) if return_stats.
  """
  validate(q_BxTxHxD.shape, k_BxSxKxD.shape, v_BxSxKxD.shape, num_local_heads, window,
           logits_soft_cap)
  blocks = BlockSizes.from_any(block_sizes)
  if start_B is not None and tuple(np.shape(start_B)) != (q_BxTxHxD.shape[0],):
    raise ValueError(f"start_B must have shape [B]=({q_BxTxHxD.shape[0]},), got "
                     f"{tuple(np.shape(start_B))}")
  impl = resolve_implementation(implementation)
  kw = dict(num_local_heads=int(num_local_heads), window=int(window),
            logits_soft_cap=logits_soft_cap, return_stats=return_stats)
  args = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
  if impl == "reference":
    return ls_attention_reference(*args, start_B=start_B, **kw)
  if impl == "xla" or k_BxSxKxD.shape[1] != q_BxTxHxD.shape[1]:
    # The kernels implement self-attention (S == T) only; cache prefill goes through xla.
    return _ls_attention_grouped(*args, start_B=start_B, group_fn=_group_xla, **kw)
  return _kernel_call(impl, *args, start_B=start_B, interpret=interpret, blocks=blocks, **kw)
