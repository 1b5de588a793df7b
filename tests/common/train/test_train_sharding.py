"""Data x fsdp sharding: 8 simulated CPU devices (2x4 mesh) give the 1-device loss."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_loss_8_devices_equals_1_device():
  # LS-attention (local + global heads) with z-loss: the model under study, every loss term.
  attention = "ls"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.common.train._sharded_loss_script",
                         attention], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # Parameters really are FSDP-sharded on the 2x4 mesh (not all replicated).
  assert any("fsdp" in s for s in out["specs8"]), out["specs8"]
  # Three steps on one repeated batch: later losses depend on the sharded update too.
  np.testing.assert_allclose(out["loss8"], out["loss1"], rtol=1e-5)
  np.testing.assert_allclose(out["logit8"], out["logit1"], rtol=1e-5)
  assert out["loss1"][2] < out["loss1"][0] - 1e-3
