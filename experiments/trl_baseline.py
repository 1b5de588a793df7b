"""HF TRL's `GRPOTrainer` as the side-by-side baseline of `experiments.bench_grpo_step`.

Only the benchmark imports this (TRL, torch and `datasets` come from the `bench` extra:
`make bench-venv`). TRL gets the same weights (our HF export of the model), the same prompt
texts (already rendered, so no chat template or system prompt differs), the same group size,
token budget, temperature, updates per generation batch, learning rate and KL coefficient.

One "GRPO step" = one generation batch and the optimizer updates made from it, as in ours:
TRL makes `steps_per_generation` optimizer steps per generation batch, generating on the first.
Times are split by wrapping the trainer's own methods: `_generate` (rollout),
`_calculate_rewards` (reward), `_get_per_token_logps_and_entropies` outside the loss (scoring of
old/ref log-probs) and the rest of each optimizer step (update).
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Sequence


def run_trl(hf_dir: str, prompts: Sequence[str], reward_fn: Callable[[list[str], list[int]], list[float]],
            *, group_size: int, max_new_tokens: int, temperature: float, updates_per_step: int,
            learning_rate: float, kl_coef: float, num_steps: int, seed: int = 0,
            threads: int | None = None,
            on_step: Callable[[int], None] | None = None) -> list[dict]:
  """Runs `num_steps` GRPO steps; returns one {total, rollout, reward, scoring, update} per step.

  `prompts` holds prompts_per_step * num_steps texts, consumed in order; `reward_fn(texts,
  prompt_indices) -> rewards`. `on_step(i)` runs after TRL's step i is timed (outside its
  time): the benchmark alternates its own step there.
  """
  import datasets
  import torch
  import transformers
  from trl import GRPOConfig, GRPOTrainer

  if threads:
    torch.set_num_threads(threads)
  transformers.logging.set_verbosity_error()
  n_prompts = len(prompts) // num_steps
  rows = n_prompts * group_size
  if rows % updates_per_step:
    raise ValueError(f"trl baseline: {rows} completions per step not divisible by "
                     f"updates_per_step={updates_per_step}")
  index_of = {p: i for i, p in enumerate(prompts)}
  data = datasets.Dataset.from_dict({"prompt": list(prompts)})

  def reward(prompts, completions, **_):
    return reward_fn(list(completions), [index_of[p] for p in prompts])

  args = GRPOConfig(
      output_dir="/tmp/trl_bench_unused", use_cpu=True, report_to=[], save_strategy="no",
      logging_strategy="no", disable_tqdm=True, seed=seed, bf16=False,
      per_device_train_batch_size=rows // updates_per_step, gradient_accumulation_steps=1,
      steps_per_generation=updates_per_step, num_iterations=1, num_generations=group_size,
      max_completion_length=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
      learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=0.0, beta=kl_coef, max_steps=num_steps * updates_per_step,
      dataloader_num_workers=0, shuffle_dataset=False)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tok)

  spent = collections.defaultdict(float)
  in_scoring_call = [False]

  def timed(name, fn):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        spent[name] += time.perf_counter() - t0
    return wrapper

  trainer._generate = timed("rollout", trainer._generate)
  trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
  gen_and_score = trainer._generate_and_score_completions
  logps = trainer._get_per_token_logps_and_entropies

  def scoring_logps(*a, **k):
    if not in_scoring_call[0]:
      return logps(*a, **k)   # inside the loss: counted as update
    return timed("scoring", logps)(*a, **k)

  def wrapped_gen_and_score(*a, **k):
    in_scoring_call[0] = True
    try:
      return gen_and_score(*a, **k)
    finally:
      in_scoring_call[0] = False

  trainer._get_per_token_logps_and_entropies = scoring_logps
  trainer._generate_and_score_completions = wrapped_gen_and_score

  steps: list[dict] = []
  marks = {"t0": 0.0}

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      if state.global_step % updates_per_step == 0:
        marks["t0"] = time.perf_counter()
        spent.clear()

    def on_step_end(self, args, state, control, **kw):
      if state.global_step % updates_per_step == 0:
        total = time.perf_counter() - marks["t0"]
        parts = {k: spent.get(k, 0.0) for k in ("rollout", "reward", "scoring")}
        steps.append({"total": total, **parts, "update": total - sum(parts.values())})
        if on_step is not None:
          on_step(len(steps) - 1)

  trainer.add_callback(StepTimer())
  trainer.train()
  return steps
