"""Rollout cost of soft thinking: soft_gumbel time / discrete time (issue 5 "Performance").

  python -m experiments.bench_rollout [--model=smollm2-135m] [--batch=8] [--tokens=128]
                                      [--repeats=5] [--train_step] [--out=bench.json]

Both modes run the same jitted rollout (prefill + `lax.while_loop`) on the same prompts, with
EOS disabled and a thinking budget of the whole length minus the "</think>" pieces, so both
decode exactly `--tokens` positions and the soft mode thinks with soft tokens throughout.
One warm-up call per mode (compilation) is excluded; the reported times are medians over
`--repeats` calls. Goal: ratio <= 1.15. With --train_step, also times one cpu_small
training step (rollout + rewards + scoring + 2 updates), excluding the first (compiling) one.
With --per_step, the per-decode-step cost of each mode's rollout and of the plain sampler
(`common.sampler.generate`, same prompts, T, top-k 5 / top-p 0.95, no EOS, cache P + N):
(median time of N positions - median time of 4 positions) / (N - 4), which removes the
prefill (issue 13 goal: rollout within 1.3x of the sampler).
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from common import load_pretrained
from common.sampler import SamplingConfig, generate, left_pad
from experiments.configs.soft_grpo import get_config
from experiments.timing import timed_calls
from soft_grpo import learner
from soft_grpo.prompts import build_prompt, think_end_ids
from soft_grpo.rollout import RolloutConfig, rollout
from soft_grpo.tasks import arithmetic_splits


class Setup(NamedTuple):
  model: Any               # the NNX decoder (for the plain sampler)
  graphdef: Any            # ... split for the rollout
  params: dict
  prompts: list[str]       # `batch` chat prompts of the arithmetic train split
  x_BxP: jax.Array         # the prompts' ids, left-padded
  start_B: jax.Array
  think_end: tuple         # the "</think>" ids


def setup(model_name: str, batch: int) -> Setup:
  model, tok, _ = load_pretrained(model_name)
  graphdef, state = nnx.split(model)
  train, _ = arithmetic_splits()
  prompts = [build_prompt(tok, train[i]["problem"], "chat") for i in range(batch)]
  x, start = left_pad(prompts, 0)
  return Setup(model, graphdef, nnx.to_pure_dict(state), prompts, jnp.asarray(x),
               jnp.asarray(start), think_end_ids(tok))


def time_rollouts(model_name: str, batch: int, tokens: int, repeats: int) -> dict:
  su = setup(model_name, batch)
  graphdef, params, x, start, te = su.graphdef, su.params, su.x_BxP, su.start_B, su.think_end
  res = {"model": model_name, "batch": batch, "tokens": tokens, "repeats": repeats,
         "prompt_len": int(x.shape[1]), "device": str(jax.devices()[0].platform)}
  for mode in ("discrete", "soft_gumbel"):
    cfg = RolloutConfig(mode=mode, max_new_tokens=tokens, think_budget=tokens - len(te),
                        think_end_ids=te, eos_ids=(), pad_id=0)
    times, out = timed_calls(
        lambda r: rollout(graphdef, params, x, start, cfg, jax.random.key(r)), repeats)
    assert int(np.asarray(out.length_B).min()) == tokens
    res[f"{mode}_s"] = statistics.median(times)
    res[f"{mode}_all_s"] = times
  res["ratio"] = res["soft_gumbel_s"] / res["discrete_s"]
  return res


def time_per_step(model_name: str, batch: int, tokens: int, repeats: int,
                  temperature: float = 0.7) -> dict:
  """Seconds per decode step (prefill removed) of the plain sampler and of each rollout mode."""
  su = setup(model_name, batch)
  graphdef, params, x, start, te = su.graphdef, su.params, su.x_BxP, su.start_B, su.think_end
  short = len(te) + 1

  def median_time(fn):
    return statistics.median(timed_calls(lambda r: fn(jax.random.key(r)), repeats)[0])

  def sampler(n):
    cfg = SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=5, top_p=0.95)
    return lambda key: generate(su.model, su.prompts, cfg, key=key, cache_len=x.shape[1] + n)

  def roll(mode, n):
    cfg = RolloutConfig(mode=mode, max_new_tokens=n, think_budget=n - len(te),
                        think_end_ids=te, eos_ids=(), pad_id=0, temperature=temperature)
    return lambda key: rollout(graphdef, params, x, start, cfg, key)

  res = {}
  for name, make in (("sampler", sampler),
                     ("discrete", lambda n: roll("discrete", n)),
                     ("soft_gumbel", lambda n: roll("soft_gumbel", n))):
    res[f"{name}_step_s"] = (median_time(make(tokens)) - median_time(make(short))) / (
        tokens - short)
  for name in ("discrete", "soft_gumbel"):
    res[f"{name}_vs_sampler"] = res[f"{name}_step_s"] / res["sampler_step_s"]
  return res


def time_train_step(model_name: str) -> dict:
  c = get_config("cpu_small")
  c.model.name = model_name
  run = learner.build(c)
  try:
    state = run.learner.init_state(run.params)

    def step(i):
      nonlocal state
      state, _ = run.learner.train_step(state)
      return state.params
    times, _ = timed_calls(step, repeats=2)
  finally:
    run.learner.reward_fn.close()
  return {"train_step_s": statistics.median(times), "train_step_all_s": times,
          "train_rows": run.cfg.grpo.rows_per_step,
          "train_tokens": run.cfg.rollout.max_new_tokens, "train_mode": run.cfg.rollout.mode}


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("model", "smollm2-135m", "Model name or HF dir.")
  flags.DEFINE_integer("batch", 8, "Rows per rollout.")
  flags.DEFINE_integer("tokens", 128, "Decoded positions per row.")
  flags.DEFINE_integer("repeats", 5, "Timed calls per mode (after one warm-up).")
  flags.DEFINE_bool("train_step", True, "Also time one cpu_small training step.")
  flags.DEFINE_bool("per_step", False, "Also time the decode step vs the plain sampler.")
  flags.DEFINE_string("out", None, "Optional JSON output path.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    res = time_rollouts(FLAGS.model, FLAGS.batch, FLAGS.tokens, FLAGS.repeats)
    if FLAGS.per_step:
      res.update(time_per_step(FLAGS.model, FLAGS.batch, FLAGS.tokens, FLAGS.repeats))
    if FLAGS.train_step:
      res.update(time_train_step(FLAGS.model))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")
  print(f"| model | batch x tokens | discrete (s) | soft_gumbel (s) | ratio (goal <= 1.15) |")
  print(f"|---|---|---|---|---|")
  print(f"| {res['model']} | {res['batch']} x {res['tokens']} | {res['discrete_s']:.3f} | "
        f"{res['soft_gumbel_s']:.3f} | {res['ratio']:.3f} |")
  if "sampler_step_s" in res:
    print(f"\nper decode step, batch {res['batch']} (prefill removed): sampler "
          f"{res['sampler_step_s'] * 1e3:.1f} ms, discrete rollout "
          f"{res['discrete_step_s'] * 1e3:.1f} ms ({res['discrete_vs_sampler']:.2f}x), "
          f"soft_gumbel rollout {res['soft_gumbel_step_s'] * 1e3:.1f} ms "
          f"({res['soft_gumbel_vs_sampler']:.2f}x; goal <= 1.3x)")
  if "train_step_s" in res:
    print(f"\none cpu_small training step ({res['train_mode']}, {res['train_rows']} rows x "
          f"{res['train_tokens']} tokens, 2 updates): {res['train_step_s']:.1f} s (median of "
          f"{len(res['train_step_all_s'])})")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
