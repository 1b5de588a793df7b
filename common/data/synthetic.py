"""A synthetic short-range dependency source: a seeded k-th order Markov chain over tokens.

The LS-attention paper motivates local heads with short-range structure in language and
tests it on a synthetic task; this source gives such structure with a known, controllable
range. The next token x_t depends on exactly the previous `order` tokens: every context
(x_{t-k}, ..., x_{t-1}) has its own sparse, peaked next-token distribution (`branching`
allowed successors drawn at random, with Dirichlet(`concentration`) weights; a small
concentration makes one successor dominant). So

  H(x_t | x_{t-1..t-j})  falls for j < k  and is flat for j >= k,

and `conditional_entropies` / `dependency_range` measure exactly that from samples.

Contexts are indexed exactly (base-V digits) while V^k <= max_states; beyond that, a seeded
multiply-xor hash of the k tokens picks one of `max_states` tables (x_t is still a function of
exactly the last k tokens; unrelated contexts may share a table).
"""

from __future__ import annotations

import dataclasses

import numpy as np

_MAX_EXACT_STATES = 2**20


@dataclasses.dataclass(frozen=True)
class MarkovChain:
  """A k-th order chain: for context state s, successors next_SxB[s] with cumulative probs."""
  vocab_size: int
  order: int
  next_SxB: np.ndarray        # int32 [S, B] successor tokens of each context state
  cumprob_SxB: np.ndarray     # float64 [S, B] cumulative successor probabilities (last = 1)
  hash_mult_K: np.ndarray | None  # uint64 [k] multipliers when contexts are hashed, else None

  @property
  def num_states(self) -> int:
    return self.next_SxB.shape[0]

  def states(self, ctx_NxK: np.ndarray) -> np.ndarray:
    """Context state index of each row of ctx_NxK (oldest token first)."""
    ctx = ctx_NxK.astype(np.uint64)
    if self.hash_mult_K is None:
      s = np.zeros(ctx.shape[0], np.uint64)
      for i in range(self.order):
        s = s * np.uint64(self.vocab_size) + ctx[:, i]
      return s.astype(np.int64)
    h = np.zeros(ctx.shape[0], np.uint64)
    for i in range(self.order):
      h = (h ^ (ctx[:, i] + np.uint64(1))) * self.hash_mult_K[i]
      h ^= h >> np.uint64(29)
    return (h % np.uint64(self.num_states)).astype(np.int64)


def make_markov_chain(vocab_size: int, order: int, *, branching: int = 4,
                      concentration: float = 0.5, seed: int = 0,
                      max_states: int = _MAX_EXACT_STATES) -> MarkovChain:
  """A random sparse k-th order chain (fixed by `seed`)."""
  if vocab_size < 2:
    raise ValueError(f"vocab_size: synthetic source needs >= 2 tokens, got {vocab_size}")
  if order < 1:
    raise ValueError(f"order: synthetic Markov order must be >= 1, got {order}")
  if not 1 <= branching <= vocab_size:
    raise ValueError(f"branching: must be in [1, vocab_size={vocab_size}], got {branching}")
  if concentration <= 0:
    raise ValueError(f"concentration: must be > 0, got {concentration}")
  rng = np.random.default_rng([seed, vocab_size, order, branching])
  exact = vocab_size**order <= max_states
  num_states = vocab_size**order if exact else max_states
  if num_states * vocab_size <= 2**26:
    # Distinct successors per state: the first `branching` of a random permutation.
    keys = rng.random((num_states, vocab_size))
    next_SxB = np.argpartition(keys, branching - 1, axis=1)[:, :branching].astype(np.int32)
  else:
    # Large tables: successors drawn with replacement (a repeat just merges two weights).
    next_SxB = rng.integers(0, vocab_size, size=(num_states, branching), dtype=np.int32)
  probs = rng.dirichlet(np.full(branching, concentration), size=num_states)
  cumprob = np.cumsum(probs, axis=1)
  cumprob[:, -1] = 1.0
  mult = None if exact else (rng.integers(1, 2**62, size=order, dtype=np.uint64) | np.uint64(1))
  return MarkovChain(vocab_size=vocab_size, order=order, next_SxB=next_SxB,
                     cumprob_SxB=cumprob, hash_mult_K=mult)


def sample_markov_tokens(chain: MarkovChain, num_tokens: int, *, seed: int = 0,
                         num_streams: int | None = None) -> np.ndarray:
  """num_tokens int32 tokens: `num_streams` independent runs of the chain, concatenated.

  Streams are sampled in lockstep (vectorized over streams), each started from a uniform
  random context; the joins add num_streams - 1 out-of-chain transitions, negligible for the
  default (>= 4096 tokens per stream).
  """
  if num_tokens < 1:
    raise ValueError(f"num_tokens: must be >= 1, got {num_tokens}")
  k = chain.order
  if num_streams is None:
    num_streams = int(np.clip(num_tokens // 4096, 1, 4096))
  length = -(-num_tokens // num_streams)
  rng = np.random.default_rng([seed, 0x5EED])
  ctx_NxK = rng.integers(0, chain.vocab_size, size=(num_streams, k), dtype=np.int64)
  out_NxL = np.empty((num_streams, length), np.int32)
  for t in range(length):
    s = chain.states(ctx_NxK)
    u = rng.random(num_streams)
    pick = np.minimum((u[:, None] >= chain.cumprob_SxB[s]).sum(axis=1),
                      chain.next_SxB.shape[1] - 1)
    nxt = chain.next_SxB[s, pick]
    out_NxL[:, t] = nxt
    ctx_NxK = np.concatenate([ctx_NxK[:, 1:], nxt[:, None].astype(np.int64)], axis=1)
  return out_NxL.reshape(-1)[:num_tokens]


def conditional_entropies(tokens: np.ndarray, vocab_size: int, max_order: int) -> np.ndarray:
  """Plug-in estimates of H(x_t | x_{t-1}, ..., x_{t-j}) in nats, for j = 0..max_order.

  H(x_t | C_j) = H(C_j, x_t) - H(C_j), both from the empirical (j+1)- and j-gram counts over
  the same positions t >= max_order. The plug-in estimate is biased low by about
  (#observed contexts * (successors - 1)) / (2 N); use enough tokens for the orders asked.
  """
  tokens = np.asarray(tokens, np.int64)
  if tokens.ndim != 1 or tokens.size <= max_order + 1:
    raise ValueError(f"tokens: need a 1-D array longer than max_order+1={max_order + 1}")
  if float(vocab_size) ** (max_order + 1) >= 2.0**62:
    raise ValueError("max_order: vocab_size^(max_order+1) must fit int64 codes; lower it")
  n = tokens.size - max_order

  def entropy_of_codes(codes):
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())

  out = np.zeros(max_order + 1)
  ctx_code = np.zeros(n, np.int64)            # code of (x_{t-j}, ..., x_{t-1})
  target = tokens[max_order:]
  h_ctx = 0.0
  for j in range(max_order + 1):
    if j > 0:
      prev = tokens[max_order - j: max_order - j + n]
      ctx_code = ctx_code + prev * (vocab_size ** (j - 1))
      h_ctx = entropy_of_codes(ctx_code)
    joint = ctx_code * vocab_size + target
    out[j] = entropy_of_codes(joint) - h_ctx
  return out


def dependency_range(tokens: np.ndarray, vocab_size: int, max_order: int, *,
                     tol: float = 0.02) -> int:
  """The smallest j whose conditional entropy is within `tol` nats of every longer context's.

  For a k-th order chain sampled long enough this is k: more context stops helping.
  """
  h = conditional_entropies(tokens, vocab_size, max_order)
  for j in range(max_order + 1):
    if np.all(h[j] - h[j:] <= tol):
      return j
  return max_order
