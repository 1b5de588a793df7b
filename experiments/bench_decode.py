"""Decode throughput: our jitted sampler vs Hugging Face `generate`, same process.

  python -m experiments.bench_decode [--repeats=5] [--batch=8] [--new_tokens=128]

SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32 by both), greedy, the same
chat prompts, exactly `new_tokens` per row (EOS disabled on both sides). Warm-up runs are
excluded; medians of `repeats` runs are reported with the ratio.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Timed runs per side (after one warm-up).")
flags.DEFINE_integer("batch", 8, "Prompts per batch.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_string("out", None, "Optional path to write the markdown table to.")

QUESTIONS = ["What is 17 + 25?", "Name three primary colors.", "Write a haiku about rain.",
             "What is the capital of France?", "Explain recursion in one sentence.",
             "How many legs does a spider have?", "Translate 'good morning' to Spanish.",
             "Give me a synonym for happy."]


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  from common import load_pretrained
  from common.sampler import SamplingConfig, generate
  from common.weights.gguf import smollm2_gguf_path

  torch.set_num_threads(os.cpu_count() or 1)
  model, tok, _ = load_pretrained("smollm2-135m", dtype="float32")
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
             for q in (QUESTIONS * 4)[:FLAGS.batch]]
  n = FLAGS.new_tokens
  cfg = SamplingConfig(max_new_tokens=n, greedy=True, eos_ids=())

  def ours():
    out = generate(model, prompts, cfg)
    jax.block_until_ready(out.tokens_BxN)
    return np.asarray(out.tokens_BxN)

  path = smollm2_gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  # Exactly n tokens per row on both sides without altering logits: no EOS stopping (HF's
  # min_new_tokens would instead mask EOS, changing which token greedy picks).
  hf.generation_config.eos_token_id = None
  width = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

  def theirs():
    with torch.no_grad():
      out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    return out[:, width:].numpy()

  results, outputs = {}, []
  for name, fn in (("ours (JAX, jit + while_loop)", ours), ("HF transformers generate", theirs)):
    fn()  # warm-up (compile / allocator)
    times = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      tokens_out = fn()
      times.append(time.perf_counter() - t0)
      print(f"{name}: {times[-1]:.2f}s", flush=True)
    results[name] = statistics.median(times)
    outputs.append(tokens_out)
  same = (outputs[0] == outputs[1]).mean()
  tokens = FLAGS.batch * n
  rows = ["| implementation | median s | tokens/s |", "|---|---|---|"]
  for name, t in results.items():
    rows.append(f"| {name} | {t:.2f} | {tokens / t:.0f} |")
  (o, h) = results.values()
  rows.append(f"\nspeed-up ours/HF: **{h / o:.2f}x** (batch {FLAGS.batch}, {n} new tokens, greedy,"
              f" float32, median of {FLAGS.repeats}); greedy tokens identical: {same:.1%}")
  table = "\n".join(rows)
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  cli.run(main)
