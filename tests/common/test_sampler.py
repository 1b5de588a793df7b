"""Sampler: KV-cache decode == full forward; greedy == step-by-step argmax; determinism;
top-k / top-p filtering; padding independence; one-line errors; sharded == single device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.config import tiny_config
from common.model import Decoder
from common.sampler import SamplingConfig, filter_logits, generate, trim


@pytest.fixture(scope="module")
def model():
  return Decoder(tiny_config(), rngs=nnx.Rngs(0))


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7], [200, 100, 50, 25]]


def _greedy_reference(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    logits, _ = model(jnp.asarray([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_kv_cache_decode_equals_full_forward(model):
  toks = jax.random.randint(jax.random.key(1), (2, 11), 0, 256)
  full, _ = model(toks)
  cache = model.init_cache(2, 16)
  logits, cache = model(toks[:, :5], cache=cache)
  pieces = [logits]
  for t in range(5, 11):
    step, cache = model(toks[:, t:t + 1], cache=cache)
    pieces.append(step)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_left_padding_does_not_change_a_row(model):
  toks = jax.random.randint(jax.random.key(2), (1, 9), 1, 256)
  padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), toks], 1)
  ref, _ = model(toks)
  got, _ = model(padded, start_B=jnp.array([4]))
  np.testing.assert_allclose(got[:, 4:], ref, atol=1e-5)


def test_greedy_matches_stepwise_argmax(model):
  out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, greedy=True))
  got = trim(out)
  for prompt, row in zip(PROMPTS, got):
    assert row == _greedy_reference(model, prompt, 10)
  # log-probs are those of the chosen tokens under the model.
  lp0 = np.asarray(out.logprobs_BxN)[0]
  assert np.all(lp0 <= 0) and np.all(np.isfinite(lp0))


def test_sampling_is_deterministic_per_key_and_varies_across_keys(model):
  cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
  a = trim(generate(model, PROMPTS, cfg, key=jax.random.key(3)))
  b = trim(generate(model, PROMPTS, cfg, key=jax.random.key(3)))
  c = trim(generate(model, PROMPTS, cfg, key=jax.random.key(4)))
  assert a == b
  assert a != c


def test_eos_stops_rows_and_sets_lengths(model):
  greedy = trim(generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, greedy=True)))
  eos = greedy[0][3]  # force row 0 to stop at its 4th token
  out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, greedy=True, eos_ids=(eos,),
                                                pad_id=0))
  lengths = np.asarray(out.lengths_B)
  first = greedy[0].index(eos) + 1
  assert lengths[0] == first
  assert np.all(np.asarray(out.tokens_BxN)[0, first:] == 0)
  for i, row in enumerate(greedy):
    expect = row.index(eos) + 1 if eos in row else 10
    assert lengths[i] == expect


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  k2 = filter_logits(logits, top_k=2, top_p=1.0)
  assert (np.asarray(k2) > -1e30).tolist() == [[True, True, False, False]]
  p = filter_logits(logits, top_k=0, top_p=0.7)   # 0.5 + 0.3 reaches 0.7
  assert (np.asarray(p) > -1e30).tolist() == [[True, True, False, False]]
  p = filter_logits(logits, top_k=0, top_p=0.4)   # first token alone reaches 0.4
  assert (np.asarray(p) > -1e30).tolist() == [[True, False, False, False]]


def _filter_full_sort(logits, top_k, top_p):
  """The two-stage filter with a vocabulary-wide sort for top-p (the reference)."""
  kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
  z = np.where(logits < kth, -np.inf, logits.astype(np.float64))
  order = np.argsort(-z, axis=-1, kind="stable")
  zs = np.take_along_axis(z, order, axis=-1)
  p = np.exp(zs - zs[:, :1])
  p /= p.sum(-1, keepdims=True)
  keep_sorted = (np.cumsum(p, -1) - p) < top_p
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, axis=-1)
  return keep & np.isfinite(z)


@pytest.mark.parametrize("top_k,top_p", [(5, 0.9), (20, 0.5), (50, 0.95), (3, 0.999)])
def test_filter_logits_top_p_within_top_k_matches_full_sort(top_k, top_p):
  logits = np.random.RandomState(top_k).randn(6, 300).astype(np.float32) * 2.0
  got = np.asarray(jax.jit(filter_logits, static_argnames=("top_k", "top_p"))(
      jnp.asarray(logits), top_k=top_k, top_p=top_p)) > -1e30
  np.testing.assert_array_equal(got, _filter_full_sort(logits, top_k, top_p))
  kept = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  np.testing.assert_array_equal(kept[got], logits[got])   # kept logits are untouched


@pytest.mark.parametrize("top_k,top_p", [(5, 0.9), (0, 0.7), (40, 1.0), (120, 0.8)])
def test_sample_filtered_draws_follow_the_filtered_softmax(top_k, top_p):
  """The sampler's draw (over the K candidates when top-k is set) has the distribution of
  softmax(`filter_logits`), the vocabulary-wide definition."""
  from common.sampler import sample_filtered
  logits = jnp.asarray(np.random.RandomState(1).randn(1, 120) * 1.5, jnp.float32)
  want = np.asarray(jax.nn.softmax(filter_logits(logits, top_k=top_k, top_p=top_p)))[0]
  n = 20_000
  tok = jax.jit(sample_filtered, static_argnames=("top_k", "top_p"))(
      jax.random.key(4), jnp.repeat(logits, n, axis=0), top_k=top_k, top_p=top_p)
  freq = np.bincount(np.asarray(tok), minlength=120) / n
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert freq[want == 0].sum() == 0


def test_top_k_one_equals_greedy(model):
  a = trim(generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, top_k=1),
                    key=jax.random.key(9)))
  b = trim(generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, greedy=True)))
  assert a == b


def test_prompt_longer_than_cache_is_one_line_error(model):
  with pytest.raises(ValueError, match=r"exceeds the cache length 16$"):
    generate(model, [[1] * 10], SamplingConfig(max_new_tokens=8), cache_len=16)


def test_bad_sampling_config():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=1.5)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=0.0)


SHARDED = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, json
  from flax import nnx
  from common.config import tiny_config
  from common.model import Decoder
  from common.sampler import SamplingConfig, generate, trim
  from common.sharding import make_mesh
  assert jax.device_count() == 8
  model = Decoder(tiny_config(d_model=128, mlp_dim=256), rngs=nnx.Rngs(0))
  prompts = [[i + 1] * (i + 1) for i in range(8)]
  cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20)
  one = generate(model, prompts, cfg, key=jax.random.key(5))
  mesh = make_mesh(2, 4)
  many = generate(model, prompts, cfg, key=jax.random.key(5), mesh=mesh)
  print(json.dumps({"same": trim(one) == trim(many),
                    "lp": float(abs(one.logprobs_BxN - many.logprobs_BxN).max())}))
""")


def test_sharded_sampling_on_8_devices_equals_1_device():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  res = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                       cwd=root, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  import json
  got = json.loads(res.stdout.strip().splitlines()[-1])
  assert got["same"], got
  assert got["lp"] < 1e-4, got


def test_generate_with_llama3_rope_scaling_config():
  # The config (with a rope_scaling dict) is part of the jit-static graphdef: must hash.
  cfg = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                  "original_max_position_embeddings": 64})
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, greedy=True))
  assert np.asarray(out.lengths_B).tolist() == [4]
