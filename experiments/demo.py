"""`make demo`: the main jobs on embedded defaults, on a laptop CPU.

1. SmolLM2-135M-Instruct (embedded GGUF) answers a few chat prompts with our jitted sampler.
2. A short LS-attention vs MHSA language-model run (stdlib corpus) with its comparison table.
3. A few SofT-GRPO steps on SmolLM2 with the arithmetic task, reward before and after.

  python -m experiments.demo [--demo_dir=runs/demo] [--skip=ls,grpo]
"""

from __future__ import annotations

import os
import time

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("demo_dir", "runs/demo", "Where the demo runs write their outputs.")
flags.DEFINE_list("skip", [], "Parts to skip: generate, ls, grpo.")


def _generate_part():
  import jax

  from common import load_pretrained
  from common.sampler import SamplingConfig, generate, trim

  t0 = time.perf_counter()
  model, tok, cfg = load_pretrained("smollm2-135m")
  print(f"loaded SmolLM2-135M-Instruct ({cfg.num_layers} layers, d={cfg.d_model}) "
        f"in {time.perf_counter() - t0:.1f}s")
  questions = ["What is 17 + 25?", "What is the capital of France?",
               "Write one sentence about the sea."]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
             for q in questions]
  out = generate(model, prompts, SamplingConfig(max_new_tokens=48, greedy=True,
                                                eos_ids=tuple(tok.eos_ids)),
                 key=jax.random.key(0))
  for q, row in zip(questions, trim(out)):
    text = tok.decode([t for t in row if t not in tok.eos_ids]).strip()
    print(f"  user: {q}\n  assistant: {text}\n")
  print("  (a 135M model: wrong arithmetic here is the model's, not the sampler's; the sampler\n"
        "   is token-identical to HF generate, tests/common/test_generate_parity.py)\n")


def main(argv):
  del argv
  os.makedirs(FLAGS.demo_dir, exist_ok=True)
  if "generate" not in FLAGS.skip:
    print("== 1. generation with SmolLM2-135M-Instruct ==")
    _generate_part()
  if "ls" not in FLAGS.skip:
    print("== 2. LS-attention vs MHSA, short language-model run ==")
    from experiments.ls_demo import run_ls_vs_mhsa_demo
    print(run_ls_vs_mhsa_demo(os.path.join(FLAGS.demo_dir, "ls_vs_mhsa")))
  if "grpo" not in FLAGS.skip:
    print("== 3. SofT-GRPO on SmolLM2, a few steps ==")
    from experiments.grpo_demo import run_grpo_demo
    print(run_grpo_demo(os.path.join(FLAGS.demo_dir, "soft_grpo")))
  root = os.path.abspath(FLAGS.demo_dir)
  print(f"\nResults are in {root}:\n"
        f"  {root}/ls_vs_mhsa/<run>/metrics.jsonl, summary.json, checkpoints/  (per LM run)\n"
        f"  {root}/soft_grpo/...                                   (GRPO run, metrics.jsonl)\n"
        f"Plots:       .venv/bin/python -m experiments.plot_runs {root}/ls_vs_mhsa/*  "
        f"(PNGs in the first run's plots/)\n"
        f"TensorBoard: .venv/bin/tensorboard --logdir {root}  (if installed)\n"
        f"Disk used:   {_du_mb(root):.0f} MB")


def _du_mb(path: str) -> float:
  total = 0
  for dirpath, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(dirpath, f))
      except OSError:
        pass
  return total / 2**20


if __name__ == "__main__":
  cli.run(main)
