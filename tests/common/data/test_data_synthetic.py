"""The synthetic k-th order Markov source has the dependency range it claims."""

from __future__ import annotations

import numpy as np
import pytest

from common.data import (conditional_entropies, dependency_range, load_token_corpus,
                         make_markov_chain, sample_markov_tokens)


@pytest.mark.parametrize("order, num_tokens", [(1, 200_000), (2, 400_000), (3, 800_000)])
def test_dependency_range_equals_order(order, num_tokens):
  chain = make_markov_chain(8, order, branching=3, seed=order)
  x = sample_markov_tokens(chain, num_tokens, seed=1)
  h = conditional_entropies(x, 8, order + 2)
  # More context helps up to k (clear drops) ...
  assert np.all(h[:order] - h[1:order + 1] > 0.03), h
  assert h[order - 1] - h[order] > 0.3, h
  # ... and not beyond (flat up to the plug-in estimator's small bias).
  assert np.all(h[order] - h[order + 1:] < 0.02), h
  assert dependency_range(x, 8, order + 2) == order
  # Peaked: the entropy rate is well below log(branching).
  assert h[order] < np.log(3)


def test_hashed_contexts_keep_the_range():
  chain = make_markov_chain(8, 3, branching=3, seed=0, max_states=128)
  assert chain.hash_mult_K is not None and chain.num_states == 128
  x = sample_markov_tokens(chain, 800_000, seed=2)
  assert dependency_range(x, 8, 5) == 3


def test_entropy_estimator_matches_iid_reference():
  rng = np.random.default_rng(0)
  p = np.array([0.5, 0.25, 0.125, 0.125])
  x = rng.choice(4, size=200_000, p=p)
  h = conditional_entropies(x, 4, 2)
  np.testing.assert_allclose(h, -(p * np.log(p)).sum(), atol=5e-3)


def test_seeded_and_deterministic():
  a = sample_markov_tokens(make_markov_chain(16, 2, seed=3), 10_000, seed=4)
  b = sample_markov_tokens(make_markov_chain(16, 2, seed=3), 10_000, seed=4)
  c = sample_markov_tokens(make_markov_chain(16, 2, seed=3), 10_000, seed=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 16


def test_synthetic_token_corpus():
  tc = load_token_corpus("synthetic", vocab_size=32, synthetic_order=2, synthetic_tokens=50_000,
                         val_fraction=0.1)
  assert tc.train.size == 50_000 and tc.val.size == 5_000
  assert tc.vocab_size == 32 and tc.eos_id is None and tc.tokenizer is None
  assert not np.array_equal(tc.train[:5_000], tc.val)


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=1, order=2), "vocab_size"),
    (dict(vocab_size=8, order=0), "order"),
    (dict(vocab_size=8, order=2, branching=9), "branching"),
])
def test_bad_chain_arguments(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}"):
    make_markov_chain(**kwargs)
