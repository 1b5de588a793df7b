"""common.sharding: the mesh builder's errors, and on 8 simulated devices: batches placed by
put_batch (any leading axis) hold the host values split over data x fsdp, and state created by
create_sharded is FSDP-sharded where the rules say so."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from common import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_make_mesh_axes_and_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == (jax.device_count(), 1)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=r"^mesh\.fsdp: got 0; allowed: a positive int or -1$"):
    sharding.make_mesh(1, 0)
  with pytest.raises(ValueError, match=r"^mesh\.fsdp: got -1 with mesh\.data=-1"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match=r"^mesh\.data x mesh\.fsdp: .* devices"):
    sharding.make_mesh(jax.device_count() + 1, 1)


def test_put_batch_single_process_is_the_global_batch():
  mesh = sharding.make_mesh()
  x = np.random.default_rng(0).integers(0, 9, (3, 2 * jax.device_count(), 5)).astype(np.int32)
  out = sharding.put_batch({"x": x, "pair": (x[0], x[1])}, mesh, leading=1)
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  assert out["x"].sharding.spec == sharding.batch_spec(mesh, 3, leading=1)
  np.testing.assert_array_equal(np.asarray(out["pair"][1]), x[1])
  with pytest.raises(ValueError, match="leading=3 is not an axis"):
    sharding.batch_spec(mesh, 3, leading=3)


SCRIPT = textwrap.dedent("""
  import json, os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from common import sharding
  mesh = sharding.make_mesh(2, -1)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 3)).astype(np.float32)
  out = {}
  b0 = sharding.put_batch(x.transpose(1, 0, 2), mesh)          # [B, A, T], batch axis 0
  b1 = sharding.put_batch({"x": x}, mesh, leading=1)["x"]       # [A, B, T], batch axis 1
  out["values"] = bool(np.array_equal(np.asarray(b1), x) and
                       np.array_equal(np.asarray(b0), x.transpose(1, 0, 2)))
  out["shard_shapes"] = [list(b0.addressable_shards[0].data.shape),
                         list(b1.addressable_shards[0].data.shape)]
  try:
    sharding.put_batch(x[:, :6], mesh, leading=1)
    out["error"] = None
  except ValueError as e:
    out["error"] = str(e)
  init = lambda: {"w": jnp.ones((64, 256)), "b": jnp.zeros((256,)), "step": jnp.zeros((), jnp.int32)}
  tree, sh = sharding.create_sharded(init, mesh, min_size=1024)
  out["specs"] = {k: str(v.spec) for k, v in sh.items()}
  out["placed"] = all(tree[k].sharding == sh[k] for k in tree)
  print(json.dumps(out))
""")


def test_put_batch_and_create_sharded_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["values"], out
  assert out["shard_shapes"] == [[1, 2, 3], [2, 1, 3]], out   # 8 rows over 2 x 4 devices
  assert out["error"] and "not divisible by the per-process data-parallel size 8" in out["error"]
  assert out["specs"]["w"] == "P(None, 'fsdp')", out   # largest dim 256 % 4 == 0
  assert out["specs"]["b"] == "P()" and out["specs"]["step"] == "P()"
  assert out["placed"]
