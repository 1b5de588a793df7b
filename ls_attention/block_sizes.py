"""`BlockSizes`: the kernel tiles of the LS-attention Pallas paths, validated once.

GPU (`implementation="pallas"`, pallas_kernels/windowed_flash.py): separate forward and
backward tiles. The backward defaults to 64 x 64: compiled for sm_90a with Triton 3.9 + ptxas,
the forward's 128 x 128 tiles spilled in the backward (dk/dv D=128: 255 registers, 624 B
spilled; D=64: 1336 B; dq D=64: 672 B) while 64 x 64 compiled with no spill (issue 9).

TPU (`implementation="splash"`, pallas_kernels/splash.py): each head group gets its own splash
blocks; None picks them from T and the window (local: key block near the window; global: 512
with splash's fused backward), see `pallas_kernels.splash.group_blocks`.

Accepted by `ls_attention(..., block_sizes=...)` as a BlockSizes or a plain dict (what
`ModelConfig.attn_block_sizes` holds, so configs stay JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

_GPU_FIELDS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
_TPU_FIELDS = ("tpu_local_block_q", "tpu_local_block_kv", "tpu_global_block")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 128      # GPU forward query tile
  block_k: int = 128      # GPU forward key tile
  block_q_bwd: int = 64   # GPU backward (dq and dk/dv kernels) query tile
  block_k_bwd: int = 64   # GPU backward key tile
  tpu_local_block_q: int | None = None   # splash, local heads; None = automatic
  tpu_local_block_kv: int | None = None
  tpu_global_block: int | None = None    # splash, global heads (q and kv, fused bwd)

  def __post_init__(self):
    for name in _GPU_FIELDS:
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 16 or v & (v - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16; got {v!r}")
    for name in _TPU_FIELDS:
      v = getattr(self, name)
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 128 or v % 128:
        raise ValueError(f"BlockSizes.{name} must be None or a multiple of 128; got {v!r}")

  @classmethod
  def from_any(cls, value: "BlockSizes | dict[str, Any] | None") -> "BlockSizes":
    """None -> defaults; a dict -> fields by name (unknown names are an error)."""
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if isinstance(value, Mapping):  # a dict, or the FrozenDict a Linen attribute becomes
      value = dict(value)
      known = {f.name for f in dataclasses.fields(cls)}
      unknown = sorted(set(value) - known)
      if unknown:
        raise ValueError(f"block_sizes: unknown field(s) {unknown}; allowed: {sorted(known)}")
      return cls(**value)
    raise ValueError(f"block_sizes must be a BlockSizes, a dict or None; got "
                     f"{type(value).__name__}")

  def gpu_kwargs(self) -> dict[str, int]:
    return {name: int(getattr(self, name)) for name in _GPU_FIELDS}

  def tpu_kwargs(self) -> dict[str, int | None]:
    return {name: getattr(self, name) for name in _TPU_FIELDS}
