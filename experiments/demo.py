"""`make demo`: the main jobs on embedded defaults, on a laptop CPU (about 10 minutes).

1. SmolLM2-135M-Instruct (embedded GGUF) answers a few chat prompts with our jitted sampler.
2. A short LS-attention vs MHSA language-model run (stdlib corpus) with its comparison table
   and plots.
3. A few SofT-GRPO steps on SmolLM2 with the arithmetic task, reward before and after. Its
   checkpoints are params only (`run.checkpoint_params_only`): the run folder is a model
   (`experiments.generate --model=<it>`), not a resumable run: 0.46 GB instead of 1.8 GB
   (SmolLM2 after one step, `du -sh` of the checkpoint).

It ends by printing where its results, plots and TensorBoard logs are.

  python -m experiments.demo [--demo_dir=runs/demo] [--skip=generate,ls,grpo]
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from experiments import cli

PARTS = ("generate", "ls", "grpo")

FLAGS = flags.FLAGS
flags.DEFINE_string("demo_dir", "runs/demo", "Where the demo runs write their outputs.")
flags.DEFINE_list("skip", [], f"Parts to skip: {', '.join(PARTS)}.")


def _generate_part():
  import jax

  from common import load_pretrained
  from common.sampler import SamplingConfig, generate, trim

  t0 = time.perf_counter()
  model, tok, cfg = load_pretrained("smollm2-135m")
  questions = ["What is 17 + 25?", "What is the capital of France?",
               "Write one sentence about the sea."]
  print(f"loaded SmolLM2-135M-Instruct ({cfg.num_layers} layers, d={cfg.d_model}) in "
        f"{time.perf_counter() - t0:.1f}s; {len(questions)} greedy answers (compiles first)...",
        flush=True)
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
             for q in questions]
  out = generate(model, prompts, SamplingConfig(max_new_tokens=48, greedy=True,
                                                eos_ids=tuple(tok.eos_ids)),
                 key=jax.random.key(0))
  for q, row in zip(questions, trim(out)):
    text = " ".join(tok.decode([t for t in row if t not in tok.eos_ids]).split())
    print(f"  user: {q}\n  assistant: {text}")
  print("  (a 135M model: wrong arithmetic here is the model's, not the sampler's; the sampler\n"
        "   is token-identical to HF generate, tests/common/test_generate_parity.py)")


def where_results_are(root: str, parts, *, seconds: float, python: str) -> str:
  """The demo's closing lines: what is where under `root`, the TensorBoard command and how
  to use the GRPO run folder as a model."""
  from experiments.grpo_demo import CHECKPOINT_NOTE
  lines = [f"== done in {seconds:.0f}s; results in {root} ({_du_mb(root):.0f} MB on disk) =="]
  if "ls" in parts:
    lines += ["  ls_vs_mhsa/mhsa, ls_vs_mhsa/ls  LM runs: metrics.jsonl, summary.json, "
              "checkpoints/ (resumable)",
              "  ls_vs_mhsa/plots               loss, perplexity, max-logit plots (PNG)"]
  if "grpo" in parts:
    lines += [f"  soft_grpo                      GRPO run: metrics.jsonl, checkpoints/ "
              f"({CHECKPOINT_NOTE})"]
  if parts & {"ls", "grpo"}:
    lines += [f"TensorBoard: tensorboard --logdir {root}   (the viewer: pip install tensorboard)"]
  if "grpo" in parts:
    lines += [f"The GRPO policy as a model: {python} -m experiments.generate "
              f"--model={os.path.join(root, 'soft_grpo')}"]
  return "\n".join(lines)


def _du_mb(path: str) -> float:
  total = 0
  for dirpath, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(dirpath, f))
      except OSError:
        pass
  return total / 2**20


def _python() -> str:
  """How to call this interpreter from the current directory (.venv/bin/python for make)."""
  rel = os.path.relpath(sys.executable)
  return rel if not rel.startswith("..") else sys.executable


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.skip) - set(PARTS))
  if unknown:
    raise ValueError(f"--skip: unknown part(s) {unknown}; allowed: {list(PARTS)}")
  parts = set(PARTS) - set(FLAGS.skip)
  t0 = time.perf_counter()
  os.makedirs(FLAGS.demo_dir, exist_ok=True)
  if "generate" in parts:
    print("== 1. generation with SmolLM2-135M-Instruct ==")
    _generate_part()
  if "ls" in parts:
    print("== 2. LS-attention vs MHSA, short language-model run ==")
    from experiments.ls_demo import run_ls_vs_mhsa_demo
    print(run_ls_vs_mhsa_demo(os.path.join(FLAGS.demo_dir, "ls_vs_mhsa")))
  if "grpo" in parts:
    print("== 3. SofT-GRPO on SmolLM2, a few steps ==")
    from experiments.grpo_demo import run_grpo_demo
    print(run_grpo_demo(os.path.join(FLAGS.demo_dir, "soft_grpo")))
  print(where_results_are(os.path.abspath(FLAGS.demo_dir), parts,
                          seconds=time.perf_counter() - t0, python=_python()))


if __name__ == "__main__":
  cli.run(main)
