"""The one error style of SofT-GRPO config sections: `<section>.<field>: what; allowed: ...`.

Each config section maps onto a frozen dataclass whose `__post_init__` checks its own fields
with these helpers; `section_from_mapping` builds a dataclass from a config section and names
unknown keys the same way. Nothing downstream re-checks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from common.config import field_error


def config_error(section: str, field: str, value: Any, allowed: str,
                 problem: str | None = None) -> ValueError:
  # The house style lives in common.config.field_error; this is its (section, field) form.
  return field_error(f"{section}.{field}", problem or f"got {value!r}", allowed)


def require(ok: bool, section: str, field: str, value: Any, allowed: str,
            problem: str | None = None) -> None:
  if not ok:
    raise config_error(section, field, value, allowed, problem)


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  """A finite real number (bools and NaN/inf are not)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check_int(section: str, field: str, value, lo: int) -> None:
  require(is_int(value) and value >= lo, section, field, value, f"an int >= {lo}")


def check_number(section: str, field: str, value, lo: float = 0.0, *,
                 strict: bool = False, hi: float | None = None,
                 hi_strict: bool = False) -> None:
  """Finite number in [lo, hi] (or (lo, ...] with strict, [..., hi) with hi_strict)."""
  ok = is_number(value) and (value > lo if strict else value >= lo)
  if hi is not None:
    ok = ok and (value < hi if hi_strict else value <= hi)
  lo_s = f"({lo}" if strict else f"[{lo}"
  hi_s = "inf)" if hi is None else (f"{hi})" if hi_strict else f"{hi}]")
  require(ok, section, field, value, f"a finite number in {lo_s}, {hi_s}")


def check_choice(section: str, field: str, value, choices) -> None:
  require(value in choices, section, field, value, str(sorted(choices)))


def section_from_mapping(cls, section: str, values: Mapping[str, Any], **fixed):
  """`cls(**values, **fixed)`; a key that is not a field of `cls` is a one-line error."""
  names = {f.name for f in dataclasses.fields(cls)}
  for key in values:
    require(key in names and key not in fixed, section, key, values[key],
            str(sorted(names - set(fixed))), problem="unknown field")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**kwargs, **fixed)
