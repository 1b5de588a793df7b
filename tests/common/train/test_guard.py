"""The shared bad-update guard: pure check inside the step, host verdicts outside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.train import guard


def _params(scale=1.0):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"a": scale * jax.random.normal(k1, (4, 3)), "b": {"c": scale * jax.random.normal(k2, (5,))}}


@pytest.mark.parametrize("jit", [False, True])
def test_check_update_reasons(jit):
  old = _params()
  check = lambda *a: guard.check_update(*a, max_param_norm_ratio=2.0)
  if jit:
    check = jax.jit(check)
  new = _params(1.01)
  c = check(jnp.float32(1.0), jnp.float32(0.5), old, new)
  assert bool(c.ok) and int(c.reason) == guard.OK
  # Both norms come back (the step reports them without computing them again).
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(float(c.prev_param_norm), np.linalg.norm(flat(old)), rtol=1e-6)
  np.testing.assert_allclose(float(c.param_norm), np.linalg.norm(flat(new)), rtol=1e-6)
  assert c.param_norm.dtype == c.prev_param_norm.dtype == jnp.float32
  assert int(check(jnp.float32(np.nan), jnp.float32(0.5), old, old).reason) == guard.BAD_LOSS
  assert int(check(jnp.float32(1.0), jnp.float32(np.inf), old, old).reason) == guard.BAD_GRAD
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), old)
  assert int(check(jnp.float32(1.0), jnp.float32(1.0), old, bad).reason) == guard.BAD_PARAMS
  c = check(jnp.float32(1.0), jnp.float32(1.0), old, _params(1e3))
  assert not bool(c.ok) and int(c.reason) == guard.NORM_JUMP and float(c.param_norm) > 100


def test_keep_if_keeps_old_tree():
  old, new = _params(), _params(5.0)
  kept = guard.keep_if(jnp.bool_(False), new, old)
  jax.tree.map(np.testing.assert_array_equal, kept, old)
  taken = guard.keep_if(jnp.bool_(True), new, old)
  jax.tree.map(np.testing.assert_array_equal, taken, new)


def test_step_guard_skip_warns_and_blocks_checkpoint_then_streak_stops():
  warnings = []
  g = guard.StepGuard(guard.GuardConfig(nonfinite="skip", max_bad_streak=3), warn=warnings.append)
  g.after_step(1, True, guard.OK)
  assert g.may_checkpoint
  g.after_step(2, False, guard.NORM_JUMP, param_norm=8e10, prev_param_norm=12.0)
  assert not g.may_checkpoint
  assert warnings == ["step 2: parameter norm jump (12 -> 8e+10, more than x2); update skipped "
                      "(nonfinite='skip')"]
  g.after_step(3, False, guard.BAD_GRAD, grad_norm=float("nan"))
  assert "non-finite gradient norm (nan)" in warnings[-1]
  with pytest.raises(guard.BadUpdate, match="3 bad updates in a row"):
    g.after_step(4, False, guard.BAD_LOSS, loss=float("inf"))


def test_step_guard_stop_names_the_quantity():
  g = guard.StepGuard(guard.GuardConfig(nonfinite="stop"))
  with pytest.raises(guard.BadUpdate) as e:
    g.after_step(7, False, guard.BAD_LOSS, loss=float("nan"))
  assert str(e.value).startswith("step 7: non-finite loss (nan); stopping")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(nonfinite="ignore"), "guard.nonfinite"),
    (dict(max_param_norm_ratio=float("nan")), "guard.max_param_norm_ratio"),
    (dict(max_param_norm_ratio=1.0), "guard.max_param_norm_ratio"),
    (dict(max_bad_streak=0), "guard.max_bad_streak")])
def test_guard_config_rejects(kwargs, field):
  with pytest.raises(ValueError, match=field):
    guard.GuardConfig(**kwargs)


@pytest.mark.parametrize("section", ["loop", "run"])
def test_guard_config_errors_name_the_callers_section(section):
  # Each trainer keeps these fields in its own config section; the message names that path.
  with pytest.raises(ValueError) as e:
    guard.GuardConfig(max_bad_streak=0, section=section)
  assert str(e.value) == f"{section}.max_bad_streak: 0; allowed: >= 1"
  with pytest.raises(ValueError) as e:
    guard.GuardConfig(nonfinite="ignore", section=section)
  assert str(e.value) == f"{section}.nonfinite: 'ignore'; allowed: skip, stop"
  # The section is not a setting: configs that differ only in it are equal.
  assert guard.GuardConfig(section=section) == guard.GuardConfig()
