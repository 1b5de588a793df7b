"""One GRPO step, ours vs HF TRL's `GRPOTrainer`, split into rollout / reward / scoring / update.

  python -m experiments.bench_grpo_step [--steps=3] [--warmup=1] [--hf_dir=/tmp/smol_hf]
      [--modes=discrete,soft_gumbel,discrete_unshared] [--trl] [--out=x.json]

Equal settings (issue 13): SmolLM2-135M-Instruct float32 (ours: the embedded weights; TRL: our
HF export of the same weights, written to --hf_dir when absent), the `cpu_small` preset: 4
prompts x group 4 = 16 completions, <= 48 new tokens, T 0.7, 2 optimizer updates per
generation batch, lr 2e-5, KL coefficient 0.001. Both get the SAME prompt texts: our chat
prompt (template + think instruction + "<think>\\n") is rendered to text once and TRL gets that
plain text (its token ids are checked against ours). Both score with our reward function.

The runs ALTERNATE in one process: each TRL step is followed by one step of each of our modes
on the same problems (a TRL callback runs ours), so background load hits all alike. The first
--warmup steps (compilation) are left out; the table shows medians. Ours is timed phase by phase
with a device sync after each (`Learner.train_step`'s work, in the same order).

TRL, torch and `datasets` come from the `bench` extra (`make bench-venv`); --notrl runs ours
alone.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Sequence

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging

from soft_grpo import learner as learner_lib
from soft_grpo.advantages import group_advantages
from common import sharding as sharding_lib

PHASES = ("rollout", "reward", "scoring", "update", "total")


# ----------------------------------------------------------------------------- our step


def build_ours(preset: str, mode: str, overrides: dict | None = None):
  """(learner, state) of `preset` in rollout `mode`."""
  from experiments.configs.soft_grpo import get_config
  c = get_config(preset)
  c.rollout.mode = mode
  for k, v in (overrides or {}).items():
    section, field = k.split(".")
    c[section][field] = v
  run = learner_lib.build(c)
  return run.learner, run.learner.init_state(run.params)


def timed_step(learner, state, problems: Sequence[dict], key):
  """`Learner.train_step`'s work on `problems`, phase by phase (its own `generate`, `rewards`,
  `score` and `update`, with a device sync after each) -> (state, {phase: seconds})."""
  g = learner.cfg.grpo
  sync = jax.block_until_ready
  t = {}
  t0 = time.perf_counter()
  out, full, _ = learner.generate(state.params, problems, g.group_size, key)
  sync(out)
  t1 = time.perf_counter()
  rewards, _ = learner.rewards(problems, full, g.group_size)
  adv = np.asarray(group_advantages(rewards, g.group_size))
  t2 = time.perf_counter()
  scored = learner.score(state, out)    # the learner's own scoring (old-log-prob skip included)
  sync(scored)
  t3 = time.perf_counter()
  whole = {"rollout": out, "advantages_B": sharding_lib.put_batch(
      np.asarray(adv, np.float32), learner.mesh), **scored}
  state, _ = learner.update(state, whole)
  sync(state.params)
  t4 = time.perf_counter()
  t.update(rollout=t1 - t0, reward=t2 - t1, scoring=t3 - t2, update=t4 - t3, total=t4 - t0)
  return state.replace(step=state.step + 1), t


def problems_of_step(learner, step: int) -> list[dict]:
  g = learner.cfg.grpo
  return [learner.problems[i] for i in learner_lib.problems_for_step(
      len(learner.problems), step, g.prompts_per_step, learner.cfg.seed)]


# Variants timed next to the modes: name -> (mode, config overrides).
VARIANTS = {
    # Before/after of prompt sharing (`grpo.share_prompt_prefix`) in the same run.
    "discrete_unshared": ("discrete", {"grpo.share_prompt_prefix": False}),
}


class OurRuns:
  """Our learners (one per mode or `VARIANTS` name) stepped together on the same problems."""

  def __init__(self, preset: str, modes: Sequence[str], overrides: dict | None = None):
    self.runs = {}
    for m in modes:
      mode, extra = VARIANTS.get(m, (m, {}))
      self.runs[m] = build_ours(preset, mode, {**(overrides or {}), **extra})
    self.times = {m: [] for m in modes}
    self.key = jax.random.key(0)

  @property
  def first(self):
    return next(iter(self.runs.values()))[0]

  def step(self, i: int):
    problems = problems_of_step(self.first, i)
    for mode, (ln, state) in self.runs.items():
      key = jax.random.fold_in(self.key, i)
      state, t = timed_step(ln, state, problems, key)
      self.runs[mode] = (ln, state)
      self.times[mode].append(t)

  def close(self):
    for ln, _ in self.runs.values():
      learner_lib._close(ln)


# ----------------------------------------------------------------------------- report


def medians(steps: list[dict], warmup: int) -> dict:
  kept = steps[warmup:] or steps[-1:]
  return {p: statistics.median(s[p] for s in kept) for p in PHASES}


def table(med: dict, *, ref: str | None, base: str = "discrete") -> str:
  """Markdown table: one column per run (seconds), then ratios ours/TRL and soft/discrete."""
  names = list(med)
  head = ["phase"] + [f"{n} (s)" for n in names]
  ours = [n for n in names if n != ref]
  if ref:
    head += [f"{n} / {ref}" for n in ours]
  soft = [n for n in ours if n != base and base in med]
  head += [f"{n} / {base}" for n in soft]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  ratio = lambda a, b: f"{a / b:.2f}x" if b > 0 else "-"
  for p in PHASES:
    row = [p] + [f"{med[n][p]:.2f}" for n in names]
    if ref:
      row += [ratio(med[n][p], med[ref][p]) for n in ours]
    row += [ratio(med[n][p], med[base][p]) for n in soft]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- TRL side


def ensure_hf_export(hf_dir: str, model_name: str = "smollm2-135m") -> str:
  if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
    from common import load_pretrained
    from common.weights.export import export_hf
    model, tok, mcfg = load_pretrained(model_name)
    export_hf(model, tok, mcfg, hf_dir)
  return hf_dir


def prompt_texts(learner, problems: Sequence[dict]) -> list[str]:
  """Our prompts rendered to text (TRL gets these), checked to tokenize back to our ids."""
  texts = []
  for p in problems:
    ids = learner.prompt_ids(p["problem"])
    text = learner.tokenizer.decode(ids, skip_special_tokens=False)
    if learner.tokenizer.encode(text, add_special_tokens=False) != list(ids):
      raise ValueError(f"prompt of {p['problem']!r} does not round-trip through text")
    texts.append(text)
  return texts


def main(argv):
  del argv
  F = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)
  modes = [m for m in F.modes.split(",") if m]
  ours = OurRuns(F.preset, modes)
  try:
    ln = ours.first
    g = ln.cfg.grpo
    problems = [problems_of_step(ln, i) for i in range(F.steps)]
    if F.trl:
      from experiments.trl_baseline import run_trl
      hf_dir = ensure_hf_export(F.hf_dir)
      texts = [t for ps in problems for t in prompt_texts(ln, ps)]
      golds = [p["answer"] for ps in problems for p in ps]
      import transformers
      hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
      for t, ps in zip(texts[:1], problems[0][:1]):
        if hf_tok(t, add_special_tokens=False)["input_ids"] != list(ln.prompt_ids(ps["problem"])):
          raise ValueError("TRL's tokenizer does not give our prompt ids for the same text")

      def reward_fn(completions, idx):
        r, _ = ln.reward_fn(list(completions), [golds[i] for i in idx])
        return [float(x) for x in r]

      trl_steps = run_trl(
          hf_dir, texts, reward_fn, group_size=g.group_size,
          max_new_tokens=ln.cfg.rollout.max_new_tokens, temperature=ln.cfg.rollout.temperature,
          updates_per_step=g.rows_per_step // g.rows_per_update,
          learning_rate=ln.cfg.optim.learning_rate, kl_coef=ln.cfg.loss.kl_coef,
          num_steps=F.steps, on_step=ours.step)
    else:
      trl_steps = None
      for i in range(F.steps):
        ours.step(i)
  finally:
    ours.close()
  med = {m: medians(ours.times[m], F.warmup) for m in modes}
  if trl_steps is not None:
    med["trl"] = medians(trl_steps, F.warmup)
  print(f"GRPO step, preset {F.preset}: {g.prompts_per_step} prompts x group {g.group_size}, "
        f"<= {ln.cfg.rollout.max_new_tokens} new tokens, T {ln.cfg.rollout.temperature}, "
        f"{g.rows_per_step // g.rows_per_update} updates/step; medians of steps "
        f"{F.warmup}..{F.steps - 1} (seconds)")
  print(table(med, ref="trl" if trl_steps is not None else None))
  if F.out:
    with open(F.out, "w") as f:
      json.dump({"medians": med, "ours": ours.times, "trl": trl_steps}, f, indent=1)
  return 0


def define_flags():
  flags.DEFINE_integer("steps", 3, "GRPO steps of each run (the first --warmup are left out).")
  flags.DEFINE_integer("warmup", 1, "Leading steps left out of the medians (compilation).")
  flags.DEFINE_string("preset", "cpu_small", "experiments/configs/soft_grpo.py preset.")
  flags.DEFINE_string("modes", "discrete,soft_gumbel,discrete_unshared",
                      "Our runs to time: rollout modes, or names from VARIANTS "
                      f"({', '.join(VARIANTS)}).")
  flags.DEFINE_bool("trl", True, "Also run HF TRL's GRPOTrainer (the `bench` extra).")
  flags.DEFINE_string("hf_dir", "/tmp/smol_hf", "HF export of the model for TRL.")
  flags.DEFINE_string("out", "", "Optional JSON with every step's times.")


if __name__ == "__main__":
  from experiments import cli
  define_flags()
  cli.run(main)
