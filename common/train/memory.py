"""Know before you run: does a compiled step fit the device, and what micro-batch would?

`check_step_fits(lower_at, micro_batch)` compiles the step at the requested micro-batch, reads
XLA's own buffer assignment (`compiled.memory_analysis()`: arguments + outputs + temporaries -
donated aliases, per device) and compares it with the device's memory. If it does not fit it
compiles once more at the smallest micro-batch, fits bytes = fixed + per_sequence * batch
through the two points and raises `DoesNotFit` with one line: what it needs, what there is,
and the largest micro-batch that fits. `oom_message(exc)` turns an XLA RESOURCE_EXHAUSTED that
still happens into the same kind of line.

Device memory: GPU/TPU `device.memory_stats()["bytes_limit"]`; CPU the physical RAM (or the
cgroup limit when lower), since XLA:CPU allocates from the process heap.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import jax

GiB = 2**30


class DoesNotFit(RuntimeError):
  """The step's compiled memory exceeds the device's; the message is one line."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  micro_batch: int
  needed_bytes: int              # per device, from XLA's buffer assignment
  available_bytes: int
  source: str                    # where available_bytes comes from
  per_sequence_bytes: float | None = None   # slope, known once a second size was compiled
  largest_micro_batch: int | None = None

  @property
  def fits(self) -> bool:
    return self.needed_bytes <= self.available_bytes


def _cgroup_limit_bytes() -> int | None:
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 2**60:
      return int(text)
  return None


def device_memory_bytes(device=None) -> tuple[int, str]:
  """(bytes one device may use, where that number comes from)."""
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]), f"bytes_limit of {device.platform}:{device.id}"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  cgroup = _cgroup_limit_bytes()
  if cgroup is not None and cgroup < ram:
    return cgroup, "cgroup memory limit"
  return ram, "physical RAM"


def compiled_bytes(compiled) -> int:
  """Peak bytes per device of a compiled executable, from XLA's buffer assignment."""
  ma = compiled.memory_analysis()
  if ma is None:
    raise RuntimeError("this backend gives no compiled.memory_analysis()")
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             + ma.generated_code_size_in_bytes - ma.alias_size_in_bytes)


def _gb(n: float) -> str:
  return f"{n / GiB:.1f} GiB"


def describe(est: MemoryEstimate, name: str = "config.batch_size") -> str:
  """The one line: needed, available, the largest micro-batch that fits."""
  head = (f"the train step needs {_gb(est.needed_bytes)} per device at {name}={est.micro_batch}"
          f", the device has {_gb(est.available_bytes)} ({est.source})")
  if est.largest_micro_batch is None:
    return head + f"; lower {name} (and raise config.grad_accum to keep the step's batch)"
  if est.largest_micro_batch < 1:
    return head + f"; even the smallest {name} does not fit (try config.remat='full')"
  return (head + f"; the largest {name} that fits is about {est.largest_micro_batch} "
          f"(~{_gb(est.per_sequence_bytes)} per sequence; raise config.grad_accum to keep the "
          "step's batch)")


def estimate(lower_at: Callable[[int], "jax.stages.Lowered"], micro_batch: int, *,
             multiple: int = 1, limit_bytes: int | None = None) -> MemoryEstimate:
  """Compiles at `micro_batch` (and, if that does not fit, at `multiple`) and estimates.

  lower_at(b) -> `jax.jit(step).lower(...)` for a micro-batch of b sequences. `multiple`: the
  micro-batch must be a multiple of this (the data-parallel size). limit_bytes overrides the
  device's memory (tests, or to leave room for something else).
  """
  if limit_bytes is not None:
    available, source = int(limit_bytes), "limit given"
  else:
    available, source = device_memory_bytes()
  needed = compiled_bytes(lower_at(micro_batch).compile())
  est = MemoryEstimate(micro_batch, needed, available, source)
  if est.fits or micro_batch <= multiple:
    return est if est.fits else dataclasses.replace(est, largest_micro_batch=0)
  small = compiled_bytes(lower_at(multiple).compile())
  per_seq = max((needed - small) / (micro_batch - multiple), 1.0)
  largest = 0
  if small <= available:
    largest = multiple + int((available - small) // per_seq)
    largest = min(largest - largest % multiple, micro_batch - multiple)
  return dataclasses.replace(est, per_sequence_bytes=per_seq, largest_micro_batch=largest)


def check_step_fits(lower_at: Callable[[int], "jax.stages.Lowered"], micro_batch: int, *,
                    multiple: int = 1, limit_bytes: int | None = None,
                    name: str = "config.batch_size") -> MemoryEstimate:
  """`estimate(...)`, raising DoesNotFit (one line, see `describe`) when it does not fit."""
  est = estimate(lower_at, micro_batch, multiple=multiple, limit_bytes=limit_bytes)
  if not est.fits:
    raise DoesNotFit(describe(est, name))
  return est


_ALLOC_RE = re.compile(r"allocat\w* (\d+) bytes")


def is_oom(exc: BaseException) -> bool:
  text = str(exc)
  return isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
      "Out of memory" in text


def oom_message(exc: BaseException, est: MemoryEstimate | None = None,
                name: str = "config.batch_size") -> str | None:
  """One line for an out-of-memory error (None if `exc` is not one)."""
  if not is_oom(exc):
    return None
  m = _ALLOC_RE.search(str(exc))
  tried = f"allocating {_gb(int(m.group(1)))} failed" if m else "an allocation failed"
  if est is not None:
    return f"out of memory ({tried}): " + describe(est, name)
  available, source = device_memory_bytes()
  return (f"out of memory ({tried}); the device has {_gb(available)} ({source}); lower {name} "
          "(and raise config.grad_accum to keep the step's batch) or set config.remat='full'")
