"""Megatron-style tensor parallelism by parameter name: on 8 simulated devices with a 2x2x2
data x fsdp x tensor mesh, the decoder's logits, the LM loss, its gradients and one update
equal those on one device (rtol 1e-5), and greedy decoding gives the same tokens, for MHSA and
LS-attention."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("attention", ["mhsa", "ls"])
def test_2x2x2_mesh_equals_one_device(attention):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.common._tensor_parallel_script", attention],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  r = json.loads(lines[0][len("RESULT "):])
  assert r["logits_rel"] < 1e-5 and r["loss_rel"] < 1e-5
  assert r["grads_rel"] < 1e-5 and r["update_rel"] < 1e-5
  assert r["greedy_equal"]          # greedy sampler tokens identical on the 2x2x2 mesh
  specs = r["specs"]
  # Megatron: column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embed/head
  assert specs["layers/0/self_attn/q_proj/kernel"] == "P('fsdp', 'tensor')"
  assert specs["layers/0/self_attn/o_proj/kernel"] == "P('tensor', 'fsdp')"
  assert specs["layers/1/mlp/up_proj/kernel"] == "P('fsdp', 'tensor')"
  assert specs["layers/1/mlp/down_proj/kernel"] == "P('tensor', 'fsdp')"
  assert specs["embed_tokens/embedding"] == "P('tensor', 'fsdp')"
  assert specs["lm_head/kernel"] == "P('fsdp', 'tensor')"
  assert specs["norm/weight"] == "P(None,)"


def test_name_rules_fall_back_to_shape_and_respect_divisibility():
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])
  # size-1 axes never split anything
  assert sharding.named_param_spec("layers/0/mlp/up_proj/kernel", (64, 128), mesh,
                                   min_size=0) == jax.sharding.PartitionSpec(None, None)
  assert sharding.logical_axes("opt/0/mu/layers/3/self_attn/o_proj/kernel", 2) == (
      "heads", "embed")
  assert sharding.logical_axes("something/else", 2) is None
  assert sharding.logical_axes("layers/0/mlp/up_proj/kernel", 1) is None  # rank mismatch
