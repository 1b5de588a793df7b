"""ls_attention_splash (TPU splash attention, interpret mode on CPU) vs reference.

With jax 0.10.2 splash runs on CPU both with `interpret=True` and with
`pltpu.InterpretParams()` (the latter only without vmap; see splash.py). If a
future jax breaks splash interpret mode itself, the probe below skips these
tests with the library's exception text instead of failing on our code.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels import ls_attention_splash, reference

F32_TOL = 2e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


@pytest.fixture(scope="module", autouse=True)
def splash_interpret_works():
  """Skip (with the real exception) if splash itself cannot interpret on CPU."""
  x = jnp.ones((1, 128, 64), jnp.float32)
  try:
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.CausalMask((128, 128))]),
        head_shards=1, q_seq_shards=1, interpret=True)
    jax.block_until_ready(kernel(x, x, x))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"splash attention cannot run in interpret mode on CPU with "
                f"jax {jax.__version__}: {type(e).__name__}: {e}")


def _ls_reference(q, k, v, num_local_heads, window, cap):
  local, _, _ = reference(q, k, v, window=window, logits_soft_cap=cap)
  glob, _, _ = reference(q, k, v, window=None, logits_soft_cap=cap)
  return jnp.concatenate(
      [local[:, :, :num_local_heads], glob[:, :, num_local_heads:]], axis=2)


def _inputs(seed, b, t, h, kvh, d):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d)),
          jax.random.normal(kk, (b, t, kvh, d)),
          jax.random.normal(kv, (b, t, kvh, d)))


CASES = [
    # b, t, h, kvh, nl, window, cap, interpret
    (2, 200, 4, 2, 2, 17, None, True),       # T % 128 != 0, GQA aligned, B>1
    (1, 200, 4, 2, 1, 30, 5.0, "params"),   # GQA split group, cap, InterpretParams
    (1, 128, 4, 1, 3, 1, None, True),        # MQA, H-1 local, window=1
    (1, 128, 4, 4, 0, 8, None, True),        # all global (plain causal MHSA)
    (1, 128, 4, 4, 4, 300, None, True),      # all local, window >= T
]


@pytest.mark.parametrize("b,t,h,kvh,nl,window,cap,interpret", CASES)
def test_forward_matches_reference(b, t, h, kvh, nl, window, cap, interpret):
  q, k, v = _inputs(0, b, t, h, kvh, 32)
  if interpret == "params":
    interpret = pltpu.InterpretParams()
  out = jax.jit(lambda q, k, v: ls_attention_splash(
      q, k, v, num_local_heads=nl, window=window, logits_soft_cap=cap,
      interpret=interpret))(q, k, v)
  ref = _ls_reference(q, k, v, nl, window, cap)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert float(jnp.max(jnp.abs(out - ref))) <= F32_TOL


def test_grads_match_reference():
  q, k, v = _inputs(1, 1, 200, 4, 2, 32)
  do = jax.random.normal(jax.random.key(9), q.shape)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do),
                            (0, 1, 2)))(q, k, v)

  got = grads(lambda q, k, v: ls_attention_splash(
      q, k, v, num_local_heads=2, window=17, interpret=True))
  want = grads(lambda q, k, v: _ls_reference(q, k, v, 2, 17, None))
  for name, g, w in zip("qkv", got, want):
    assert float(jnp.max(jnp.abs(g - w))) <= F32_TOL, name


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_local_heads=5, window=8), "num_local_heads"),
    (dict(num_local_heads=2, window=0), "window"),
])
def test_bad_arguments_raise(kwargs, match):
  q, k, v = _inputs(0, 1, 128, 4, 2, 32)
  with pytest.raises(ValueError, match=match):
    ls_attention_splash(q, k, v, interpret=True, **kwargs)


def test_sharded_over_batch_with_shard_map():
  # Simulated devices must be set before jax starts: run in a subprocess.
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from jax.sharding import AxisType
      from pallas_kernels import ls_attention_splash, reference
      ks = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(ks[0], (4, 160, 4, 32))
      k = jax.random.normal(ks[1], (4, 160, 2, 32))
      v = jax.random.normal(ks[2], (4, 160, 2, 32))
      loc = reference(q, k, v, window=20)[0]
      glo = reference(q, k, v, window=None)[0]
      want = jnp.concatenate([loc[:, :, :3], glo[:, :, 3:]], axis=2)
      for types in [(AxisType.Auto,) * 2, (AxisType.Explicit,) * 2]:
        mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=types)
        with jax.set_mesh(mesh):
          out = jax.jit(lambda q, k, v: ls_attention_splash(
              q, k, v, num_local_heads=3, window=20, interpret=True,
              mesh=mesh))(q, k, v)
        assert len(out.sharding.device_set) == 4, out.sharding
        err = float(jnp.max(jnp.abs(out - want)))
        assert err <= 2e-5, err
      # left padding and statistics through shard_map
      start_B = jnp.array([0, 30, 0, 159])
      mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
      with jax.set_mesh(mesh):
        out, lse, amax = jax.jit(lambda q, k, v, s: ls_attention_splash(
            q, k, v, s, num_local_heads=3, window=20, return_stats=True,
            interpret=True, mesh=mesh))(q, k, v, start_B)
      loc = reference(q, k, v, start_B, window=20, num_local_heads=3)
      valid = (jnp.arange(160)[None, :] >= start_B[:, None])[:, None, :]
      assert float(jnp.max(jnp.abs(out - loc[0]))) <= 2e-5
      assert float(jnp.max(jnp.where(valid, jnp.abs(lse - loc[1]), 0))) <= 2e-5
      assert float(jnp.max(jnp.where(valid, jnp.abs(amax - loc[2]), 0))) <= 2e-5
      print("OK")
  """)
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_local_kernel_grid_is_shrunk_only_without_mixing():
  # Why two calls: splash shrinks the kv grid of a local-only mask to the
  # band (2 of 8 blocks here), but not when local and causal heads are mixed.
  from pallas_kernels.splash import _make_kernel  # pylint: disable=import-outside-toplevel
  t = 1024
  local = splash.LocalMask((t, t), (99, 0), 0)
  causal = splash.CausalMask((t, t))

  def kv_grid(masks):
    kernel = _make_kernel(splash.MultiHeadMask(masks), mqa=False, block_q=128,
                          block_kv=128, fused_bwd=False, soft_cap=None,
                          interpret=True)
    return kernel.fwd_mask_info.data_next.shape[-1]

  assert kv_grid([local] * 3) == 2
  assert kv_grid([local, local, causal]) == 8


def test_lowers_for_tpu():
  # Lowering for the "tpu" platform runs on a CPU host through the Mosaic
  # lowering. Local group: fwd, dq, dkv; global group (T / 256 = 1 key block,
  # fused backward): fwd, fused dq+dkv. 5 kernels.
  q = jnp.ones((2, 256, 4, 64), jnp.bfloat16)
  k = jnp.ones((2, 256, 2, 64), jnp.bfloat16)

  def loss(q, k, v):
    out = ls_attention_splash(q, k, v, num_local_heads=2, window=50)
    return jnp.sum(out.astype(jnp.float32))

  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(
      lowering_platforms=("tpu",)).as_text()
  assert hlo.count("tpu_custom_call") == 5


# Left padding (segment ids) and statistics (lse from splash's residual,
# max |logit| from the small TPU kernel), fwd and grads vs the dense reference.
PAD_CASES = [
    # b, t, h, kvh, nl, window, cap, start_B
    (2, 200, 4, 2, 3, 17, None, (0, 37)),   # GQA group cut 3|1 (kv repeated)
    (2, 130, 4, 1, 4, 1, 5.0, (9, 0)),      # MQA, all local, window 1, cap
    (1, 128, 2, 2, 0, 8, None, (100,)),     # all global
    (2, 100, 2, 1, 1, 300, None, (0, 100)),  # window >= T; a fully padded row
]


@pytest.mark.parametrize("case", PAD_CASES)
def test_padding_and_stats_match_reference(case):
  b, t, h, kvh, nl, window, cap, start = case
  q, k, v = _inputs(3, b, t, h, kvh, 32)
  start_B = jnp.array(start, jnp.int32)
  do = jax.random.normal(jax.random.key(4), q.shape)

  def run(fn):
    @jax.jit
    def f(q, k, v):
      (out, lse, amax), vjp = jax.vjp(fn, q, k, v)
      return out, lse, amax, vjp((do, jnp.zeros_like(lse), jnp.zeros_like(amax)))
    return f(q, k, v)

  got = run(lambda q, k, v: ls_attention_splash(
      q, k, v, start_B, num_local_heads=nl, window=window, logits_soft_cap=cap,
      return_stats=True, interpret=True))
  want = run(lambda q, k, v: reference(q, k, v, start_B, window=window,
                                       num_local_heads=nl, logits_soft_cap=cap))
  valid = (jnp.arange(t)[None, :] >= start_B[:, None])[:, None, :]
  err = lambda a, b: float(jnp.max(jnp.abs(a - b)))
  assert err(got[0], want[0]) <= F32_TOL
  assert err(jnp.where(valid, got[1], 0), jnp.where(valid, want[1], 0)) <= F32_TOL
  assert err(jnp.where(valid, got[2], 0), jnp.where(valid, want[2], 0)) <= F32_TOL
  for name, g, w in zip("qkv", got[3], want[3]):
    assert err(g, w) <= F32_TOL, name
  for bi, s in enumerate(start):
    assert float(jnp.max(jnp.abs(got[0][bi, :s]), initial=0.0)) == 0.0


def test_max_abs_logit_kernel_matches_reference():
  from pallas_kernels.tpu_max_logit import max_abs_logit  # pylint: disable=import-outside-toplevel
  b, t, h, kvh, d = 2, 512, 4, 2, 32
  q, k, _ = _inputs(5, b, t, h, kvh, d)
  start_B = jnp.array([0, 200])
  qs = (q / jnp.sqrt(d)).transpose(0, 2, 1, 3)
  for window, bq, bk in ((None, 128, 256), (100, 256, 128), (1, 128, 128)):
    got = max_abs_logit(qs, k.transpose(0, 2, 1, 3), start_B, window=window,
                        block_q=bq, block_k=bk, interpret=True)
    want = reference(q, k, k, start_B, window=window)[2]
    assert float(jnp.max(jnp.abs(got - want))) <= F32_TOL, window


def test_group_blocks():
  from pallas_kernels.splash import group_blocks  # pylint: disable=import-outside-toplevel
  assert group_blocks(16384, 128) == (128, 128)      # local: near the window
  assert group_blocks(16384, 300) == (512, 512)
  assert group_blocks(16384, None) == (512, 512)     # global: 512
  assert group_blocks(200, None) == (256, 256)       # short T: no 512 padding
  assert group_blocks(16384, None, block_q=1024, block_kv=256) == (1024, 256)
