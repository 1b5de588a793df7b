"""SofT-GRPO / GRPO configs (issue 5), read by experiments/soft_grpo.py.

  python -m experiments.soft_grpo --config=experiments/configs/soft_grpo.py:<preset> \
      --config.mode=soft_gumbel|discrete --config.model=smollm2-135m|<HF dir> --workdir=runs/x

Presets:
  official   the paper's / official scripts' training defaults (zz1358m/SofT-GRPO-master,
             verl): group 8, 64 prompts/step, mini-batch 32 (2 updates/step), AdamW lr 1e-6,
             wd 0.01, clip 1.0 constant; top-k 5, top-p 0.95, tau 0.1, noise 1.0; PPO clip
             0.2, dual clip 3, k3 KL 0.001; prompts 1024 / responses 8192 tokens, answer
             top-k 5 / top-p 0.95 (SofT-GRPO-deepscaler-8k.sh); verl's loss aggregation
             (token-mean per micro-batch of 2 rows / accumulation steps). GPU-sized.
             Every preset evaluates soft modes at tau 0.5 (`eval_tau`, official inference).
  cpu_small  SmolLM2-135M-Instruct on 1-2 digit addition (last number scored), T 0.7, small
             batch and short responses (48 tokens, think budget 24):
             a few steps in minutes on 2 CPU cores (the scaled-down reproduction).
  test       a tiny random model with a byte tokenizer; for the test-suite (seconds).

Prompt template: the chat template with a system message asking the model to think inside
<think> ... </think> and answer in \\boxed{}; the user turn is the problem + the official
suffix "Let's think step by step and output the final answer within \\boxed{}."; the assistant
turn is opened with "<think>\\n". SmolLM2 has no "</think>" token: the string tokenizes into
several pieces; thinking ends when the recorded token is the LAST piece (`think_end_ids`
overrides the ids), and the budget force-inserts all pieces.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("official", "cpu_small", "test")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0
  c.model = "smollm2-135m"     # embedded name, HF checkpoint dir, .gguf, or "tiny" (random)
  c.dtype = "float32"
  c.mode = "soft_gumbel"       # discrete | soft | soft_gumbel | soft_dirichlet | soft_gaussian
  # --- task ---
  c.task = "arithmetic"        # "arithmetic" or a .jsonl / .parquet with problem, answer
  c.arith_ops = ("add", "mul")
  c.arith_digits = (2, 3)
  c.arith_num_train = 2048
  c.arith_num_test = 256
  c.arith_seed = 0
  c.prompt = "chat"            # chat (template + <think>) | plain (no template) | bare (problem=)
  c.answer_format = "boxed"    # "boxed" (last \boxed{}) | "last_number"
  c.reward_workers = 2         # math-verify worker processes (0 = in-process)
  c.reward_deadline_s = 3.0
  # --- rollout ---
  c.max_new_tokens = 4096
  c.think_budget = 3072
  c.top_k = 5
  c.top_p = 0.95
  c.temperature = 1.0
  c.tau = 0.1                  # Gumbel-softmax temperature of the training rollouts
  c.eval_tau = 0.5             # tau of every evaluation (official soft-thinking inference)
  c.noise_factor = 1.0
  c.dirichlet_alpha = 1.0
  c.gaussian_std = 0.05
  c.answer_top_k = 5           # official scripts' answer phase; 0 = off
  c.answer_top_p = 0.95
  c.think_end = "</think>"
  c.think_end_ids = ()         # overrides the tokenization of think_end when non-empty
  c.think_end_match = "last"   # "last" piece (issue rule) | "sequence" (all pieces in a row)
  c.cold_stop_entropy = 0.0    # 0 = off
  c.cold_stop_steps = 0
  # --- GRPO ---
  c.group_size = 8
  c.prompts_per_step = 64
  c.mini_batch_prompts = 32
  c.ppo_epochs = 1
  c.learning_rate = 1e-6
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.clip_ratio_low = 0.2
  c.clip_ratio_high = 0.2
  c.clip_ratio_c = 3.0
  c.kl_coef = 0.001
  c.entropy_coef = 0.0
  # "token_mean": one token-mean over the mini-batch; "token_mean_per_micro": verl's token-mean
  # over each micro-batch of loss_agg_micro_rows rows, / the number of micro-batches.
  c.loss_agg = "token_mean"
  c.loss_agg_micro_rows = 2    # official ppo_micro_batch_size_per_gpu
  c.max_prompt_len = 512
  c.micro_batch_rows = 0       # 0 = whole mini-batch; else gradient accumulation / score chunks
  c.num_steps = 500
  # --- mesh: data x fsdp (-1 = the remaining devices) ---
  c.mesh_data = -1
  c.mesh_fsdp = 1
  # --- bookkeeping ---
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.eval_every = 0             # 0 = no periodic eval
  c.eval_problems = 64
  c.eval_n = 4
  c.export = False             # write the trained policy as an HF checkpoint at the end
  c.progress = True
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "official"
  if preset not in PRESETS:
    raise ValueError(f"preset {preset!r} is not one of {PRESETS}")
  c = _base()
  c.preset = preset
  if preset == "official":
    # Official SofT-GRPO-deepscaler-8k.sh: prompt 1024, response 8192, rollout T 1,
    # top-k 5 / top-p 0.95 in both phases; kl_loss_coef 0.001 (all five official scripts).
    # verl's loss: token-mean over each micro-batch of 2 rows per GPU / accumulation steps.
    c.max_prompt_len = 1024
    c.max_new_tokens = 8192
    c.think_budget = 8192 - 64
    c.answer_top_k = 5
    c.answer_top_p = 0.95
    c.micro_batch_rows = 16      # memory only: official ppo_micro_batch_size_per_gpu 2 x 8 GPUs
    c.loss_agg = "token_mean_per_micro"
    c.loss_agg_micro_rows = 2
  if preset == "cpu_small":
    # SmolLM2-135M rarely writes \boxed{}; its final number is scored instead, and 1- and
    # 2-digit sums at T=0.7 give a reward rate (~5-40%) that GRPO can learn from.
    c.arith_ops = ("add",)
    c.arith_digits = (1, 2)
    c.arith_num_train = 512
    c.arith_num_test = 64
    c.answer_format = "last_number"
    c.temperature = 0.7
    c.answer_top_p = 0.95
    c.max_new_tokens = 48
    c.think_budget = 24
    c.group_size = 4
    c.prompts_per_step = 4
    c.mini_batch_prompts = 2
    # 135M params move visibly in a few steps only with a larger LR than the 7B runs.
    c.learning_rate = 2e-5
    c.max_prompt_len = 96
    c.num_steps = 10
    c.checkpoint_every = 4
    c.eval_problems = 16
    c.eval_n = 4
    c.reward_workers = 1
  elif preset == "test":
    c.model = "tiny"
    c.prompt = "bare"
    c.answer_format = "last_number"
    c.arith_ops = ("add",)
    c.arith_digits = (1,)
    c.arith_num_train = 24
    c.arith_num_test = 8
    c.max_new_tokens = 16
    c.think_budget = 6
    c.group_size = 2
    c.prompts_per_step = 4
    c.mini_batch_prompts = 2
    c.learning_rate = 1e-3
    c.max_prompt_len = 24
    c.num_steps = 2
    c.checkpoint_every = 1
    c.reward_workers = 0
    c.eval_problems = 4
    c.eval_n = 2
    c.progress = False
  return c
