r"""One-shot accelerator check of the LS-attention kernels (issue 9): correctness, then speed.

Run it once on a machine with one GPU (or a TPU VM), from the repository root:

  python benchmarks/accelerator_check.py                      # full run, < 6 min on one GPU
  python benchmarks/accelerator_check.py --smoke              # tiny shapes; runs on CPU too
  python benchmarks/accelerator_check.py --out=/tmp/check.md  # where the markdown goes

1. Compile + correctness. The kernel path (`pallas` on GPU, `splash` on TPU, `pallas` in
   interpret mode on CPU) against the dense float32 `ls_attention_reference`: output, dq/dk/dv
   and the four statistics, with left padding (start_B), 11 local : 1 global heads, MHA and
   GQA, D 64 and 128, in float32 and bfloat16. Max-abs errors are printed next to their bound.
   float32 bound 5e-3 x max(1, |ref|) (Triton may run float32 dots as TF32), bfloat16 3e-2 x
   max(1, |ref|).
2. Speed. Forward+backward (grad of sum(out * R)) medians after warm-up, per
   T in {4k, 8k, 16k, 32k}, D in {64, 128}, MHA (KVH = H) and GQA (KVH = H / 4), B=1, H=12,
   window 128, bfloat16:
     ls        LS-attention kernel, 11 local : 1 global (the paper's layer)
     local     the windowed kernel with all 12 heads local (its own throughput)
     cudnn_c   jax.nn.dot_product_attention(is_causal=True), cuDNN (GPU only)
     cudnn_w   same with local_window_size=(127, 0): cuDNN sliding window (GPU only)
     xla_c     jax.nn.dot_product_attention(implementation="xla"), causal (T <= 8k: O(T^2))
   TFLOP/s count visible (query, key) pairs only: 4 D flops per pair forward and 10 D
   backward (FlashAttention-2's 2.5x, recomputation included), times B x heads.
3. Goals (issue 9, printed as measured, not asserted): LS fwd+bwd at T=16k at least 5x
   faster than cuDNN causal; the all-local windowed kernel at >= 50% of the device's dense
   bf16 peak at T >= 8k (peak from a small table of known devices, or --peak_tflops).

A time budget (--budget_s, default 300 s from the start) stops the speed sweep early: no new
row starts after it (a started row, ~10-20 s, finishes); skipped rows are listed.
Prints everything and writes one markdown file with the tables.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform as platform_mod
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ls_attention import ls_attention, ls_attention_reference  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
    "L40S": 362.0, "L4": 121.0, "B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}
NUM_HEADS, NUM_LOCAL, WINDOW = 12, 11, 128


def _peak(kind: str, override: float | None):
  if override:
    return override
  for name, tf in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return tf
  return None


def visible_pairs(t: int, window: int | None) -> int:
  if window is None or window >= t:
    return t * (t + 1) // 2
  return window * t - window * (window - 1) // 2


def fwd_bwd_flops(b, t, d, num_local, num_global, window) -> float:
  pairs = num_local * visible_pairs(t, window) + num_global * visible_pairs(t, None)
  return 14.0 * d * pairs * b


def _inputs(key, b, t, h, kvh, d, dtype):
  ks = jax.random.split(key, 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, kvh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kvh, d), jnp.float32).astype(dtype)
  r = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, r


def _grad_fn(attn):
  """jit(q, k, v, r) -> (out, (dq, dk, dv)) of sum(attn(q, k, v) * r)."""
  def run(q, k, v, r):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(r.astype(out.dtype))
  return jax.jit(run)


# ---------------------------------------------------------------------------------------------
# 1. correctness


def check_correctness(impl, interpret, t, log):
  rows, ok = [], True
  start_B = jnp.array([0, t // 3], jnp.int32)
  for dtype, tol in ((jnp.float32, 5e-3), (jnp.bfloat16, 3e-2)):
    for d in (64, 128):
      for kvh in (NUM_HEADS, NUM_HEADS // 4):
        q, k, v, r = _inputs(jax.random.key(d + kvh), 2, t, NUM_HEADS, kvh, d, dtype)
        kw = dict(num_local_heads=NUM_LOCAL, window=min(WINDOW, t // 2), start_B=start_B)
        t0 = time.perf_counter()
        got = _grad_fn(functools.partial(ls_attention, implementation=impl,
                                         interpret=interpret, **kw))
        out, grads = jax.block_until_ready(got(q, k, v, r))
        compile_run_s = time.perf_counter() - t0
        f32 = [x.astype(jnp.float32) for x in (q, k, v, r)]
        ref_out, ref_grads = _grad_fn(functools.partial(ls_attention_reference, **kw))(*f32)
        _, stats = jax.jit(functools.partial(ls_attention, implementation=impl,
                                             interpret=interpret, return_stats=True,
                                             **kw))(q, k, v)
        _, ref_stats = jax.jit(functools.partial(ls_attention_reference, return_stats=True,
                                                 **kw))(*f32[:3])
        errs = {}
        for name, a, b in (("out", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)):
          scale = max(1.0, float(jnp.max(jnp.abs(b))))
          errs[name] = (float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))), tol * scale)
        for name in ref_stats:
          scale = max(1.0, float(jnp.abs(ref_stats[name])))
          errs[name] = (float(jnp.abs(stats[name] - ref_stats[name])), tol * scale)
        passed = all(np.isfinite(e) and e <= bound for e, bound in errs.values())
        ok &= passed
        rows.append((jnp.dtype(dtype).name, d, "MHA" if kvh == NUM_HEADS else "GQA",
                     compile_run_s, errs, passed))
        log(f"correctness {jnp.dtype(dtype).name} D={d} KVH={kvh}: "
            f"{'PASS' if passed else 'FAIL'} (compile+run {compile_run_s:.1f}s) " +
            ", ".join(f"{n} {e:.2e}/{bd:.1e}" for n, (e, bd) in errs.items()))
  return rows, ok


# ---------------------------------------------------------------------------------------------
# 2. speed


def _median_time(fn, args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile + first run
  first = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first


def _candidates(backend, impl, interpret, t, max_xla_len):
  cands = {
      "ls": (functools.partial(ls_attention, num_local_heads=NUM_LOCAL, window=WINDOW,
                               implementation=impl, interpret=interpret),
             NUM_LOCAL, NUM_HEADS - NUM_LOCAL),
      "local": (functools.partial(ls_attention, num_local_heads=NUM_HEADS, window=WINDOW,
                                  implementation=impl, interpret=interpret), NUM_HEADS, 0),
  }
  if backend == "gpu":
    cands["cudnn_c"] = (functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                          implementation="cudnn"), 0, NUM_HEADS)
    cands["cudnn_w"] = (functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                          local_window_size=(WINDOW - 1, 0),
                                          implementation="cudnn"), NUM_HEADS, 0)
  if t <= max_xla_len:
    cands["xla_c"] = (functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                        implementation="xla"), 0, NUM_HEADS)
  return cands


def run_speed(args, backend, impl, interpret, log, t_start):
  rows, skipped = [], []
  deadline = t_start + args.budget_s
  # Goal shapes first, so a tight budget still measures them.
  configs = [(t, d, g) for t in args.seq_lens for d in (128, 64) for g in ("MHA", "GQA")]
  configs.sort(key=lambda c: (c[0] != 16384, c[0] < 8192, c[0], -c[1], c[2]))
  for t, d, heads in configs:
    kvh = NUM_HEADS if heads == "MHA" else NUM_HEADS // 4
    if time.perf_counter() > deadline:
      skipped.append((t, d, heads))
      continue
    q, k, v, r = _inputs(jax.random.key(t + d), 1, t, NUM_HEADS, kvh, d, jnp.bfloat16)
    row = {"T": t, "D": d, "heads": heads}
    for name, (attn, nl, ng) in _candidates(backend, impl, interpret, t,
                                            args.max_xla_len).items():
      try:
        med, first = _median_time(_grad_fn(attn), (q, k, v, r), args.repeats)
      except Exception as e:  # noqa: BLE001 - report the failure as a table cell
        row[name] = (None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
        log(f"T={t} D={d} {heads} {name}: FAILED {row[name][2]}")
        continue
      tflops = fwd_bwd_flops(1, t, d, nl, ng, WINDOW) / med / 1e12
      row[name] = (med, tflops, None)
      log(f"T={t} D={d} {heads} {name}: {med * 1e3:.2f} ms fwd+bwd, {tflops:.3g} TFLOP/s "
          f"(first call incl. compile {first:.1f}s)")
    rows.append(row)
  return rows, skipped


# ---------------------------------------------------------------------------------------------
# report


def _fmt_ms(cell):
  if cell is None:
    return "n/a"
  med, _, err = cell
  return f"FAILED ({err})" if med is None else f"{med * 1e3:.2f}"


def _fmt_tf(cell):
  if cell is None or cell[0] is None:
    return "n/a"
  return f"{cell[1]:.3g}"


def report(args, device, corr_rows, corr_ok, speed_rows, skipped, peak, elapsed):
  names = ["ls", "local", "cudnn_c", "cudnn_w", "xla_c"]
  lines = [f"### Accelerator check: {device}", "",
           f"Command: `python benchmarks/accelerator_check.py{' --smoke' if args.smoke else ''}`"
           f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}; "
           f"total {elapsed:.0f}s)", "",
           f"Correctness vs dense float32 reference (B=2, T={args.check_len}, H=12, 11 local, "
           f"start_B=[0, T/3]; max-abs error / bound): **{'PASS' if corr_ok else 'FAIL'}**", "",
           "| dtype | D | heads | compile+run s | out | dq | dk | dv | stats (max err) | result |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for dtype, d, heads, s, errs, passed in corr_rows:
    stat_err = max(e for n, (e, _) in errs.items() if n not in ("out", "dq", "dk", "dv"))
    lines.append(f"| {dtype} | {d} | {heads} | {s:.1f} | " + " | ".join(
        f"{errs[n][0]:.1e}/{errs[n][1]:.0e}" for n in ("out", "dq", "dk", "dv")) +
        f" | {stat_err:.1e} | {'PASS' if passed else 'FAIL'} |")
  lines += ["", f"Forward+backward, bf16, B=1, H=12, window {WINDOW}, median of {args.repeats} "
            "after warm-up: ms (TFLOP/s on visible pairs). GQA: KVH=3. "
            "ls = 11 local : 1 global; local = 12 local.", "",
            "| T | D | heads | " + " | ".join(names) + " | cudnn_c / ls |",
            "|---|---|---|" + "---|" * len(names) + "---|"]
  for row in speed_rows:
    cells = [f"{_fmt_ms(row.get(n))} ({_fmt_tf(row.get(n))})" if row.get(n) else "n/a"
             for n in names]
    ratio = "n/a"
    if row.get("ls") and row.get("cudnn_c") and row["ls"][0] and row["cudnn_c"][0]:
      ratio = f"{row['cudnn_c'][0] / row['ls'][0]:.2f}x"
    lines.append(f"| {row['T']} | {row['D']} | {row['heads']} | " + " | ".join(cells) +
                 f" | {ratio} |")
  if skipped:
    lines += ["", "Skipped (time budget): " + ", ".join(f"T={t} D={d} {h}"
                                                       for t, d, h in skipped)]
  lines += ["", "Goals (issue 9):"]
  g1 = [r for r in speed_rows if r["T"] == 16384 and r.get("ls") and r.get("cudnn_c")
        and r["ls"][0] and r["cudnn_c"][0]]
  for r in g1:
    ratio = r["cudnn_c"][0] / r["ls"][0]
    lines.append(f"- LS fwd+bwd vs cuDNN causal, T=16k D={r['D']} {r['heads']}: {ratio:.2f}x "
                 f"({'met' if ratio >= 5 else 'NOT met'}; goal >= 5x)")
  if not g1:
    lines.append("- LS vs cuDNN causal at T=16k: not measured here")
  if peak:
    for r in speed_rows:
      if r["T"] >= 8192 and r.get("local") and r["local"][0]:
        frac = r["local"][1] / peak
        lines.append(f"- windowed kernel T={r['T']} D={r['D']} {r['heads']}: "
                     f"{r['local'][1]:.0f} TFLOP/s = {100 * frac:.0f}% of {peak:.0f} peak "
                     f"({'met' if frac >= 0.5 else 'NOT met'}; goal >= 50%)")
  else:
    lines.append("- % of peak: device peak unknown (pass --peak_tflops)")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpret mode)")
  p.add_argument("--out", default="benchmarks/accelerator_check.md")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--budget_s", type=float, default=300.0,
                 help="seconds from the start after which no new speed row is begun")
  p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak override")
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  backend = jax.default_backend()
  dev = jax.devices()[0]
  device = f"{dev.device_kind} ({backend}, {jax.device_count()} device(s), " \
           f"{platform_mod.machine()})"
  impl = {"gpu": "pallas", "tpu": "splash"}.get(backend, "pallas")
  interpret = backend not in ("gpu", "tpu")
  if args.smoke:
    args.seq_lens, args.check_len, args.max_xla_len = [256], 128, 256
    args.repeats = args.repeats or 1
  else:
    args.seq_lens, args.check_len, args.max_xla_len = [4096, 8192, 16384, 32768], 1024, 8192
    args.repeats = args.repeats or 5
  log = lambda s: print(s, flush=True)  # noqa: E731
  log(f"device: {device}; kernel implementation: {impl}{' (interpret)' if interpret else ''}")
  corr_rows, corr_ok = check_correctness(impl, interpret, args.check_len, log)
  speed_rows, skipped = run_speed(args, backend, impl, interpret, log, t_start)
  text = report(args, device, corr_rows, corr_ok, speed_rows, skipped,
                _peak(dev.device_kind, args.peak_tflops), time.perf_counter() - t_start)
  print("\n" + text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  log(f"wrote {args.out}")
  return 0 if corr_ok else 1


if __name__ == "__main__":
  sys.exit(main())
