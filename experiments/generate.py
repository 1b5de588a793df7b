"""Chat-formatted generation from the command line.

  python -m experiments.generate --model=smollm2-135m --prompt="What is 17 + 25?"
  python -m experiments.generate --model=runs/ls --step=160 --prompt="def add("   # a run folder
"""

from __future__ import annotations

import sys
import time

import dataclasses

import jax
from absl import flags

import ls_attention  # noqa: F401  (registers attention="ls": LS models load too)
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m",
                    "Embedded name, HF checkpoint dir, .gguf file, or a train_lm / soft_grpo "
                    "run folder.")
flags.DEFINE_integer("step", None, "Checkpoint step when --model is a run folder (default: newest).")
flags.DEFINE_multi_string("prompt", ["What is 17 + 25?"], "User message(s); one row each.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter (1.0 = off).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("system", None, "Optional system message.")
flags.DEFINE_bool("raw", False, "Feed the prompt as-is, without the chat template.")


def main(argv):
  del argv
  from common import load_pretrained
  from common.pretrained import prompt_ids
  from common.sampler import SamplingConfig, generate, trim

  # Checked before the model loads: a bad flag costs no waiting (one-line errors: cli.run).
  greedy = FLAGS.temperature == 0
  cfg = SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, greedy=greedy,
                       temperature=1.0 if greedy else FLAGS.temperature,
                       top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  model, tokenizer, _ = load_pretrained(FLAGS.model, step=FLAGS.step)
  prompts = [prompt_ids(tokenizer, text, raw=FLAGS.raw, system=FLAGS.system)
             for text in FLAGS.prompt]
  cfg = dataclasses.replace(cfg, eos_ids=tuple(getattr(tokenizer, "eos_ids", ()) or ()))
  t0 = time.perf_counter()
  out = generate(model, prompts, cfg, key=jax.random.key(FLAGS.seed))
  rows = trim(out)
  dt = time.perf_counter() - t0
  for text, row in zip(FLAGS.prompt, rows):
    answer = tokenizer.decode([t for t in row if t not in cfg.eos_ids])
    print(f"### user\n{text}\n### assistant\n{answer.strip()}\n")
  n = sum(len(r) for r in rows)
  print(f"[{n} tokens in {dt:.1f}s incl. compile]", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
