"""One guard against bad updates, shared by the LM and the GRPO trainers.

Inside the jitted step, `check_update` looks at the loss, the gradient norm and the updated
parameters; an update is bad if any is non-finite, or if the parameter norm jumps by more than
`max_param_norm_ratio` in one step (an "absurd" update: finite, but the run is blowing up, as
AdamW at lr 1e3 does). `keep_if` then keeps the old parameters and optimizer state. On the host,
`StepGuard` turns the verdict into a warning (nonfinite="skip") or a one-line error
(nonfinite="stop", or too many bad steps in a row), and tells the loop whether the current state
may be checkpointed: never right after a bad step.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NONFINITE_POLICIES = ("skip", "stop")
# reason codes carried out of the jitted step as an int32
OK, BAD_LOSS, BAD_GRAD, BAD_PARAMS, NORM_JUMP = range(5)
REASONS = {OK: "ok", BAD_LOSS: "non-finite loss", BAD_GRAD: "non-finite gradient norm",
           BAD_PARAMS: "non-finite parameters after the update",
           NORM_JUMP: "parameter norm jump"}


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  nonfinite: str = "skip"              # skip the bad update, or stop the run
  max_param_norm_ratio: float = 2.0    # |params| growing more than this in one step is absurd
  max_bad_streak: int = 20             # this many bad steps in a row stop the run even on skip
  # The config section that holds these fields ("loop" in ls_lm, "run" in soft_grpo): error
  # messages name `<section>.<field>`. Not a setting: left out of ==, hash and repr.
  section: str = dataclasses.field(default="guard", compare=False, repr=False)

  def __post_init__(self):
    s = self.section
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f"{s}.nonfinite: {self.nonfinite!r}; allowed: "
                       f"{', '.join(NONFINITE_POLICIES)}")
    if not (math.isfinite(self.max_param_norm_ratio) and self.max_param_norm_ratio > 1):
      raise ValueError(f"{s}.max_param_norm_ratio: {self.max_param_norm_ratio}; allowed: a "
                       "finite number > 1")
    if self.max_bad_streak < 1:
      raise ValueError(f"{s}.max_bad_streak: {self.max_bad_streak}; allowed: >= 1")


class UpdateCheck(NamedTuple):
  """The verdict of `check_update` (a pytree: it leaves the jitted step as is)."""
  ok: jax.Array               # bool[]: the update may be applied
  reason: jax.Array           # int32[]: OK or the first bad reason (REASONS)
  param_norm: jax.Array       # f32[]: |new params|
  prev_param_norm: jax.Array  # f32[]: |old params| (the `prev_param_norm` metric)


def check_update(loss, grad_norm, old_params, new_params, *,
                 max_param_norm_ratio: float) -> UpdateCheck:
  """Pure; call inside the step. Both parameter norms are returned so the step reports them
  without computing them again."""
  old_norm = optax.tree.norm(old_params)
  new_norm = optax.tree.norm(new_params)
  finite_params = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                     for x in jax.tree.leaves(new_params)]))
  jump = new_norm > max_param_norm_ratio * old_norm
  reason = jnp.where(~jnp.isfinite(loss), BAD_LOSS,
                     jnp.where(~jnp.isfinite(grad_norm), BAD_GRAD,
                               jnp.where(~finite_params, BAD_PARAMS,
                                         jnp.where(jump, NORM_JUMP, OK)))).astype(jnp.int32)
  return UpdateCheck(ok=reason == OK, reason=reason, param_norm=new_norm.astype(jnp.float32),
                     prev_param_norm=old_norm.astype(jnp.float32))


def keep_if(ok, new_tree, old_tree):
  """new where ok else old, leaf by leaf (params, optimizer state, ...)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_tree, old_tree)


class BadUpdate(RuntimeError):
  """The run stopped because of a bad update (one-line message)."""


class StepGuard:
  """Host-side verdicts: warn and skip, or stop; and whether a checkpoint may be written."""

  def __init__(self, config: GuardConfig, *, warn=None):
    self.config = config
    self.streak = 0
    self.total_bad = 0
    self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))

  @staticmethod
  def describe(step: int, reason: int, *, loss=None, grad_norm=None, param_norm=None,
               prev_param_norm=None, max_ratio=None) -> str:
    what = REASONS.get(int(reason), f"reason {reason}")
    if reason == BAD_LOSS:
      detail = f" ({loss})"
    elif reason == BAD_GRAD:
      detail = f" ({grad_norm})"
    elif reason == NORM_JUMP and param_norm is not None:
      detail = (f" ({prev_param_norm:.3g} -> {param_norm:.3g}, more than x{max_ratio:g})"
                if prev_param_norm is not None else f" (to {param_norm:.3g})")
    else:
      detail = ""
    return f"step {step}: {what}{detail}"

  def after_step(self, step: int, ok: bool, reason: int, **values) -> None:
    """Call once per step with the step's verdict; raises BadUpdate to stop the run."""
    if ok:
      self.streak = 0
      return
    self.streak += 1
    self.total_bad += 1
    msg = self.describe(step, reason, max_ratio=self.config.max_param_norm_ratio, **values)
    if self.config.nonfinite == "stop":
      raise BadUpdate(f"{msg}; stopping (nonfinite='stop'); the parameters of step "
                      f"{step - 1} are kept and no checkpoint was written from this step")
    if self.streak >= self.config.max_bad_streak:
      raise BadUpdate(f"{msg}; {self.streak} bad updates in a row (max_bad_streak="
                      f"{self.config.max_bad_streak}); stopping. Lower the learning rate")
    self._warn(f"{msg}; update skipped (nonfinite='skip')")

  @property
  def may_checkpoint(self) -> bool:
    return self.streak == 0
