"""Chat-formatted generation from the command line.

  python -m experiments.generate --model=smollm2-135m --prompt="What is 17 + 25?"
"""

from __future__ import annotations

import sys
import time

import jax
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Embedded name, HF checkpoint dir or .gguf file.")
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
  from common.sampler import SamplingConfig, generate, trim

  model, tokenizer, _ = load_pretrained(FLAGS.model)   # one-line errors: cli.run
  prompts = []
  for text in FLAGS.prompt:
    if FLAGS.raw:
      prompts.append(tokenizer.encode(text))
      continue
    messages = [{"role": "user", "content": text}]
    if FLAGS.system:
      messages.insert(0, {"role": "system", "content": FLAGS.system})
    prompts.append(tokenizer.encode(tokenizer.apply_chat_template(messages)))
  cfg = SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, greedy=FLAGS.temperature <= 0,
                       temperature=FLAGS.temperature if FLAGS.temperature > 0 else 1.0,
                       top_k=FLAGS.top_k, top_p=FLAGS.top_p, eos_ids=tuple(tokenizer.eos_ids))
  t0 = time.perf_counter()
  out = generate(model, prompts, cfg, key=jax.random.key(FLAGS.seed))
  rows = trim(out)
  dt = time.perf_counter() - t0
  for text, row in zip(FLAGS.prompt, rows):
    answer = tokenizer.decode([t for t in row if t not in tokenizer.eos_ids])
    print(f"### user\n{text}\n### assistant\n{answer.strip()}\n")
  n = sum(len(r) for r in rows)
  print(f"[{n} tokens in {dt:.1f}s incl. compile]", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
