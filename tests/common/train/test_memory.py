"""Know before you run (common.train.memory): an impossible micro-batch is refused before the
first step with one line naming what it needs, what there is and the largest that fits."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from common.train import memory
from experiments import train_lm
from experiments.configs import ls_lm


def _config(**overrides):
  c = ls_lm.get_config("test")
  c.update(num_layers=1, seq_len=16, batch_size=16, grad_accum=1, mesh_data=1, **overrides)
  return c


def _lower_at(seq_len=64, d=32):
  """A step-like function whose memory grows with the batch: [b, T, T] scores."""
  w = jnp.ones((d, d))

  def f(x_BxTxD):
    s = jnp.einsum("btd,bsd->bts", x_BxTxD @ w, x_BxTxD)
    return jnp.sum(jax.nn.softmax(s, -1) @ x_BxTxD)

  grad = jax.jit(jax.grad(f))
  return lambda b: grad.lower(jax.ShapeDtypeStruct((b, seq_len, d), jnp.float32))


def test_estimate_and_largest_micro_batch_really_fits():
  lower_at = _lower_at()
  big = memory.compiled_bytes(lower_at(64).compile())
  small = memory.compiled_bytes(lower_at(2).compile())
  assert big > 8 * small
  limit = (big + small) // 2
  with pytest.raises(memory.DoesNotFit) as e:
    memory.check_step_fits(lower_at, 64, multiple=2, limit_bytes=limit)
  msg = str(e.value)
  assert "\n" not in msg and "config.batch_size=64" in msg and "limit given" in msg
  est = memory.estimate(lower_at, 64, multiple=2, limit_bytes=limit)
  assert not est.fits and 2 <= est.largest_micro_batch < 64 and est.largest_micro_batch % 2 == 0
  assert f"the largest config.batch_size that fits is about {est.largest_micro_batch}" in msg
  # The suggested micro-batch fits, and (within the linear fit's step) it is the largest.
  assert memory.compiled_bytes(lower_at(est.largest_micro_batch).compile()) <= limit
  assert memory.compiled_bytes(lower_at(est.largest_micro_batch + 8).compile()) > limit
  fits = memory.check_step_fits(lower_at, 64, multiple=2, limit_bytes=big)
  assert fits.fits and fits.needed_bytes == big


def test_device_memory_is_positive_and_named():
  available, source = memory.device_memory_bytes()
  assert available > 2**28 and source


def test_trainer_refuses_an_impossible_micro_batch_before_the_first_step(tmp_path):
  c = _config(memory_limit_gb=0.001)
  with pytest.raises(memory.DoesNotFit, match=r"^the train step needs .* at config\.batch_size"
                                              r"=16, the device has 0\.0 GiB \(limit given\); "):
    train_lm.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl") or \
      os.path.getsize(tmp_path / "metrics.jsonl") == 0
  assert not any(n.isdigit() for n in os.listdir(tmp_path / "checkpoints"))


def test_trainer_cli_prints_one_line(tmp_path, capsys, monkeypatch):
  from experiments import cli
  monkeypatch.setattr(train_lm, "train", lambda c, w, **k: (_ for _ in ()).throw(
      memory.DoesNotFit("the train step needs 9.0 GiB per device at config.batch_size=8")))
  monkeypatch.setattr(train_lm, "FLAGS", type("F", (), {"workdir": str(tmp_path),
                                                         "config": _config(),
                                                         "allow_config_change": False})())
  assert cli.call_main(train_lm.main, ["x"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: the train step needs 9.0 GiB")


def test_oom_error_becomes_one_line(tmp_path, capsys, monkeypatch):
  raw = ("RESOURCE_EXHAUSTED: Out of memory allocating 89259922088 bytes.\n"
         + "\n".join(f"  frame {i}" for i in range(80)))
  line = memory.oom_message(RuntimeError(raw))
  assert line.startswith("out of memory (allocating 83.1 GiB failed); the device has ")
  assert "\n" not in line and "config.batch_size" in line
  assert memory.oom_message(RuntimeError("shape mismatch")) is None
  from experiments import cli
  monkeypatch.setattr(train_lm, "train",
                      lambda c, w, **k: (_ for _ in ()).throw(RuntimeError(raw)))
  monkeypatch.setattr(train_lm, "FLAGS", type("F", (), {"workdir": str(tmp_path),
                                                         "config": _config(),
                                                         "allow_config_change": False})())
  assert cli.call_main(train_lm.main, ["x"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: out of memory (allocating 83.1 GiB")
