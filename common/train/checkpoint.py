"""Orbax checkpoints for any trainer: one pytree of arrays plus JSON extras.

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  ckpt.save(step, state, extras={"data_iter": it.get_state()})
  restored = ckpt.restore_latest(abstract_state)   # None when nothing usable is there
  if restored: step, state, extras = restored

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no half-written step behind. A step that is listed but unreadable
(files corrupted or truncated afterwards) is moved to `<dir>.corrupt/<step>` with a warning
and the previous step is tried, down to the oldest kept one.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def _reason(e: Exception) -> str:
  """'Type: first line of the message', without reprs of bound methods or other objects."""
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
  if not first or "<bound method" in first or first.startswith("<"):
    return type(e).__name__
  return f"{type(e).__name__}: {first}"


def abstract_like(tree):
  """ShapeDtypeStruct tree (with shardings) that tells orbax how to restore `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.async_save = async_save
    self._mgr = self._make_manager()

  def _make_manager(self):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=self.async_save)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=("state", "extras"))

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state, extras: dict[str, Any] | None = None) -> None:
    """Saves (asynchronously when enabled); a step that already exists is left as is."""
    if step in self._mgr.all_steps():
      return
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras or {})))

  def restore(self, step: int, abstract_state):
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore()))
    return out["state"], dict(out["extras"] or {})

  def restore_extras(self, step: int) -> dict:
    """The JSON extras of `step` alone (the state is not read)."""
    out = self._mgr.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
    return dict(out["extras"] or {})

  def restore_latest(self, abstract_state):
    """(step, state, extras) of the newest readable checkpoint, or None if there is none.

    A step that fails to restore is moved aside (to `<dir>.corrupt/`) only once an older step
    restores with the same abstract state: that proves the layout is right and the newer step
    is damaged. If no step restores, nothing is moved and a one-line ValueError is raised
    (silently starting from scratch would throw a good run away); it says "all ... unreadable"
    when the stored shapes match the current layout or cannot be read either, else it blames a
    changed model/optimizer layout.
    """
    self.wait()
    failed: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        state, extras = self.restore(step, abstract_state)
      except Exception as e:  # orbax / tensorstore raise many kinds on damaged files
        failed.append((step, _reason(e)))
        continue
      for bad_step, why in failed:
        msg = (f"checkpoint step {bad_step} in {self.directory} is unreadable ({why}); "
               f"fell back to step {step}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        self._quarantine(bad_step)
      return step, state, extras
    if failed:
      step, why = failed[0]
      if all(self._layout_matches(s, abstract_state) is not False for s, _ in failed):
        raise ValueError(f"{self.directory}: all {len(failed)} checkpoint(s) are unreadable "
                         f"(corrupt or truncated files; newest, step {step}: {why}); nothing "
                         f"was deleted — move the directory aside or use a new workdir to "
                         f"start fresh")
      raise ValueError(f"{self.directory}: no checkpoint restores with the current model/"
                       f"optimizer layout (newest, step {step}: {why}); nothing was deleted — "
                       f"use the matching config or a new workdir")
    return None

  def _layout_matches(self, step: int, abstract_state) -> bool | None:
    """Whether the stored array shapes/dtypes of `step` are those of `abstract_state`
    (compared as multisets, so key spelling does not matter); None if its metadata is
    unreadable too, i.e. the step is damaged rather than of another layout."""
    try:
      meta = ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / "state")
      meta = getattr(meta, "item_metadata", meta)
      stored = jax.tree.leaves(getattr(meta, "tree", meta))
      stored = sorted((tuple(x.shape), str(x.dtype)) for x in stored)
    except Exception:  # a damaged step: its metadata is as unreadable as its arrays
      return None
    want = sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(abstract_state))
    return stored == want

  def _quarantine(self, step: int) -> None:
    """Moves a bad step aside so later saves of that step number can succeed."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory + ".corrupt"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    if os.path.exists(dst):
      shutil.rmtree(dst)
    if os.path.exists(src):
      shutil.move(src, dst)
    self._mgr.close()
    self._mgr = self._make_manager()

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
