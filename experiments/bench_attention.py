r"""LS-attention (xla path) vs causal MHSA on CPU: forward, forward+backward, one decode step.

Shapes follow the paper's v2 layer (arXiv 2505.15548): B=1, H=12, D=64, 11 local : 1 global,
window=100. MHSA is `jax.nn.dot_product_attention(is_causal=True)`, which on CPU masks a dense
T x T score matrix. Each timing is the median of --repeats runs after one warm-up run
(compilation excluded). Decode = one new token at slot T-1 of a cache of length T (cache
update + attention; caches donated so updates are in place).

  python -m experiments.bench_attention                       # T in {1024, 2048, 4096, 8192}
  python -m experiments.bench_attention --seq_lens=1024 --repeats=2 --out=/tmp/attn.md

FLOP-ratio lower bound: LS scores / causal-MHSA scores, counting only visible (query, key)
pairs: (n_local * sum_i min(i+1, w) + n_global * T(T+1)/2) / (H * T(T+1)/2). An
implementation cannot beat it against a causal-aware MHSA; against the dense CPU MHSA it can.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys

from absl import app, flags

from experiments import cli, timing
import jax
import jax.numpy as jnp

from ls_attention import init_ls_cache, kv_memory_ratio, ls_attention, ls_cache_attend

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192"], "Context lengths T.")
flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (after one warm-up).")
flags.DEFINE_integer("num_heads", 12, "Query heads H (= KV heads).")
flags.DEFINE_integer("num_local_heads", 11, "Local heads.")
flags.DEFINE_integer("window", 100, "Local window.")
flags.DEFINE_integer("head_dim", 64, "Head dim D.")
flags.DEFINE_integer("batch", 1, "Batch B.")
flags.DEFINE_integer("max_mhsa_bwd_len", 4096,
                     "Largest T for the MHSA fwd+bwd (its dense backward at T=8192 compiles to "
                     "~13 GB of temporaries); LS fwd+bwd runs at every T.")
flags.DEFINE_string("implementation", "xla", "ls_attention implementation to time.")
flags.DEFINE_string("out", None, "Optional path to write the markdown table to.")


def _time(fn, *args, repeats: int, donate_first_arg_loop: bool = False):
  """Median wall seconds of fn(*args) after one warm-up call (experiments.timing)."""
  if donate_first_arg_loop:  # fn(state, *rest) -> (out, state); state is donated
    state = [args[0]]

    def call(_):
      out, state[0] = fn(state[0], *args[1:])
      return out, state[0]
    times, _ = timing.timed_calls(call, repeats)
  else:
    times, _ = timing.timed_calls(lambda _: fn(*args), repeats)
  return statistics.median(times)


def flop_ratio_lower_bound(t: int, h: int, nl: int, w: int) -> float:
  causal = t * (t + 1) / 2
  local = sum(min(i + 1, w) for i in range(t))
  return (nl * local + (h - nl) * causal) / (h * causal)


def _fwd_bwd(fn):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_one(t: int) -> dict:
  b, h, d, nl, w = FLAGS.batch, FLAGS.num_heads, FLAGS.head_dim, FLAGS.num_local_heads, FLAGS.window
  ks = jax.random.split(jax.random.PRNGKey(t), 6)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in ks[:3])
  ls = functools.partial(ls_attention, num_local_heads=nl, window=w,
                         implementation=FLAGS.implementation)
  mhsa = functools.partial(jax.nn.dot_product_attention, is_causal=True)
  r = {"T": t}
  r["ls_fwd"] = _time(jax.jit(ls), q, k, v, repeats=FLAGS.repeats)
  r["mhsa_fwd"] = _time(jax.jit(mhsa), q, k, v, repeats=FLAGS.repeats)
  r["ls_fb"] = _time(_fwd_bwd(ls), q, k, v, repeats=FLAGS.repeats)
  if t <= FLAGS.max_mhsa_bwd_len:
    r["mhsa_fb"] = _time(_fwd_bwd(mhsa), q, k, v, repeats=FLAGS.repeats)
  del q, k, v

  # Decode: a cache of length T holding T-1 tokens; the step writes slot T-1 and attends.
  q1, k1, v1 = (jax.random.normal(kk, (b, 1, h, d), jnp.float32) for kk in ks[3:])
  cache = init_ls_cache(b, t, num_heads=h, num_kv_heads=h, head_dim=d, num_local_heads=nl,
                        window=w)
  cache = jax.tree.map(lambda x: jax.random.normal(ks[0], x.shape, x.dtype), cache)
  index = jnp.asarray(t - 1, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def ls_step(cache, q1, k1, v1, index):
    out, cache = ls_cache_attend(q1, k1, v1, cache, index=index, num_local_heads=nl, window=w,
                                 implementation=FLAGS.implementation)
    return out, cache

  @functools.partial(jax.jit, donate_argnums=(0,))
  def mhsa_step(kv, q1, k1, v1, index):
    kc, vc = kv
    zero = jnp.zeros((), jnp.int32)
    kc = jax.lax.dynamic_update_slice(kc, k1, (zero, index, zero, zero))
    vc = jax.lax.dynamic_update_slice(vc, v1, (zero, index, zero, zero))
    lens = jnp.full((b,), index + 1, jnp.int32)
    out = jax.nn.dot_product_attention(q1, kc, vc, key_value_seq_lengths=lens)
    return out, (kc, vc)

  kv = tuple(jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in ks[4:6])
  reps = max(FLAGS.repeats, 20)  # decode steps are short: more samples
  r["ls_dec"] = _time(ls_step, cache, q1, k1, v1, index, repeats=reps, donate_first_arg_loop=True)
  r["mhsa_dec"] = _time(mhsa_step, kv, q1, k1, v1, index, repeats=reps,
                        donate_first_arg_loop=True)
  r["flop_lb"] = flop_ratio_lower_bound(t, h, nl, w)
  r["kv_ratio"] = kv_memory_ratio(h, nl, w, t)
  return r


def table(rows) -> str:
  head = ("| T | LS fwd (s) | MHSA fwd (s) | fwd ratio | LS fwd+bwd (s) | MHSA fwd+bwd (s) | "
          "fwd+bwd ratio | LS decode (ms) | MHSA decode (ms) | decode ratio | "
          "FLOP-ratio lower bound | KV-cache ratio |")
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    fb = (f"{r['ls_fb']:.3f} | {r['mhsa_fb']:.3f} | {r['ls_fb'] / r['mhsa_fb']:.3f}"
          if "mhsa_fb" in r else f"{r['ls_fb']:.3f} | skipped (memory) | -")
    lines.append(
        f"| {r['T']} | {r['ls_fwd']:.3f} | {r['mhsa_fwd']:.3f} | "
        f"{r['ls_fwd'] / r['mhsa_fwd']:.3f} | {fb} | {1e3 * r['ls_dec']:.2f} | "
        f"{1e3 * r['mhsa_dec']:.2f} | {r['ls_dec'] / r['mhsa_dec']:.3f} | "
        f"{r['flop_lb']:.3f} | {r['kv_ratio']:.3f} |")
  return "\n".join(lines)


def goals(rows) -> str:
  """The issue's targets on the 2-core CPU (fwd/fwd+bwd at T=4096, decode at 8192)."""
  by_t = {r["T"]: r for r in rows}
  lines = []
  if 4096 in by_t and "mhsa_fb" in by_t[4096]:
    r = by_t[4096]
    f, fb = r["ls_fwd"] / r["mhsa_fwd"], r["ls_fb"] / r["mhsa_fb"]
    lines.append(f"- T=4096 forward ratio {f:.3f} (goal <= 0.20: {'met' if f <= 0.2 else 'MISSED'})")
    lines.append(f"- T=4096 fwd+bwd ratio {fb:.3f} (goal <= 0.15: "
                 f"{'met' if fb <= 0.15 else 'MISSED'})")
  if 8192 in by_t:
    dr = by_t[8192]["ls_dec"] / by_t[8192]["mhsa_dec"]
    lines.append(f"- T=8192 decode ratio {dr:.3f} (goal <= 0.5: {'met' if dr <= 0.5 else 'MISSED'})")
  return ("\nGoals:\n" + "\n".join(lines) + "\n") if lines else ""


def main(argv):
  del argv
  rows = []
  for t in (int(x) for x in FLAGS.seq_lens):
    rows.append(bench_one(t))
    print(f"T={t} done: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()
                                      if k != "T"), flush=True)
  header = (f"LS-attention ({FLAGS.implementation}) vs MHSA "
            f"(jax.nn.dot_product_attention, is_causal=True); B={FLAGS.batch}, "
            f"H={FLAGS.num_heads}, D={FLAGS.head_dim}, {FLAGS.num_local_heads} local : "
            f"{FLAGS.num_heads - FLAGS.num_local_heads} global, window={FLAGS.window}, float32; "
            f"median of {FLAGS.repeats} runs (decode: {max(FLAGS.repeats, 20)}) after warm-up.\n"
            f"Machine: {platform.machine()} {os.cpu_count()} CPU cores, jax {jax.__version__} "
            f"backend={jax.default_backend()}.\nCommand: python -m experiments.bench_attention "
            + " ".join(sys.argv[1:]) + "\n\n")
  md = header + table(rows) + "\n" + goals(rows)
  print(md)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(md)


if __name__ == "__main__":
  cli.run(main)
