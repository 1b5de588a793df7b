"""SofT-GRPO / GRPO configs (issue 5), read by experiments/soft_grpo.py.

  python -m experiments.soft_grpo --config=experiments/configs/soft_grpo.py:<preset> \
      --config.rollout.mode=soft_gumbel|discrete --config.model.name=smollm2-135m|<HF dir> \
      --workdir=runs/x

Each section maps one to one onto a frozen dataclass that validates it (`soft_grpo.config`):
model -> ModelSpec, task -> TaskConfig, reward -> RewardConfig (reward.check ->
AnswerCheckConfig), rollout -> RolloutConfig, loss -> LossConfig, grpo -> GRPOConfig,
optim -> OptimConfig, mesh -> MeshConfig, run -> RunConfig.

Presets:
  official   the paper's / official scripts' training defaults (zz1358m/SofT-GRPO-master,
             verl): group 8, 64 prompts/step, mini-batch 32 (2 updates/step), AdamW lr 1e-6,
             wd 0.01, clip 1.0 constant; top-k 5, top-p 0.95, tau 0.1, noise 1.0; PPO clip
             0.2, dual clip 3, k3 KL 0.001; prompts 1024 / responses 8192 tokens, answer
             top-k 5 / top-p 0.95 (SofT-GRPO-deepscaler-8k.sh); verl's loss aggregation
             (token-mean per micro-batch of 2 rows / accumulation steps). GPU-sized.
             Every preset evaluates soft modes at tau 0.5 (`run.eval_tau`, official inference).
  cpu_small  SmolLM2-135M-Instruct on 1-2 digit addition (last number scored), T 0.7, small
             batch and short responses (48 tokens, think budget 24):
             a few steps in minutes on 2 CPU cores (the scaled-down reproduction).
  test       a tiny random model with a byte tokenizer; for the test-suite (seconds).

Prompt template (`soft_grpo.prompts`): the chat template with a system message asking the
model to think inside <think> ... </think> and answer in \\boxed{}; the user turn is the
problem + the official suffix "Let's think step by step and output the final answer within
\\boxed{}."; the assistant turn is opened with "<think>\\n". SmolLM2 has no "</think>" token:
the string tokenizes into several pieces; thinking ends when the recorded token is the LAST
piece (`rollout.think_end_ids` overrides the ids), and the budget force-inserts all pieces.
"""

from __future__ import annotations

import ml_collections

from common.config import field_error

PRESETS = ("official", "cpu_small", "test")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0
  c.model = dict(
      name="smollm2-135m",      # embedded name, HF checkpoint dir, .gguf, or "tiny" (random)
      dtype="float32",
      remat="none")             # "none" | "dots" | "full": rematerialise blocks in the update
  c.task = dict(
      source="arithmetic",      # "arithmetic" or a .jsonl / .parquet with problem, answer
      prompt="chat",            # chat (template + <think>) | plain (no template) | bare (problem=)
      ops=("add", "mul"), digits=(2, 3), num_train=2048, num_test=256, seed=0)
  c.reward = dict(
      num_workers=2,            # math-verify worker processes (hard per-answer deadline)
      item_deadline_s=3.0,
      check=dict(answer_format="boxed"))   # "boxed" (last \boxed{}) | "last_number"
  c.rollout = dict(
      mode="soft_gumbel",       # discrete | soft | soft_gumbel | soft_dirichlet | soft_gaussian
      max_new_tokens=4096, think_budget=3072, top_k=5, top_p=0.95, temperature=1.0,
      tau=0.1,                  # Gumbel-softmax temperature of the training rollouts
      noise_factor=1.0, dirichlet_alpha=1.0, gaussian_std=0.05,
      answer_top_k=5,           # official scripts' answer phase; 0 = off
      answer_top_p=0.95,
      think_end="</think>",
      think_end_ids=(),         # overrides the tokenization of think_end when non-empty
      think_end_match="last",   # "last" piece (issue rule) | "sequence" (all pieces in a row)
      cold_stop_entropy=0.0,    # 0 = off
      cold_stop_steps=0)
  c.loss = dict(
      clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, kl_coef=0.001,
      entropy_coef=0.0,
      # "token_mean": one token-mean over the mini-batch; "token_mean_per_micro": verl's
      # token-mean over each micro-batch of loss_agg_micro_rows rows, / number of micro-batches.
      loss_agg="token_mean",
      loss_agg_micro_rows=2)    # official ppo_micro_batch_size_per_gpu
  c.grpo = dict(
      group_size=8, prompts_per_step=64, mini_batch_prompts=32, ppo_epochs=1,
      max_prompt_len=512,
      prompt_len_bucket=0,      # 0: pad to max_prompt_len; B: to the longest, rounded up to B
      micro_batch_rows=0,       # 0 = whole mini-batch; else gradient accumulation / chunks
      # Each prompt runs once per group (prefill; scoring and update unless remat or
      # LS-attention), exact.
      share_prompt_prefix=True)
  c.optim = dict(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)   # data x fsdp x tensor (-1 = the rest)
  c.run = dict(
      num_steps=500, checkpoint_every=50, keep_checkpoints=3,
      # True: params-only checkpoints (no optimizer state / reference policy, 1/4 the size;
      # make demo uses it). The run folder is a model but cannot resume (refused, one line).
      checkpoint_params_only=False,
      eval_every=0,             # 0 = no periodic eval
      eval_problems=64, eval_n=4,
      eval_tau=0.5,             # tau of every evaluation (official soft-thinking inference)
      export=False,             # write the trained policy as an HF checkpoint at the end
      progress=True,
      # Bad updates (non-finite loss / gradient / params, or |params| growing more than
      # max_param_norm_ratio in one update) keep the old state: "skip" warns, "stop" ends the
      # run; max_bad_streak bad steps in a row stop it anyway. Never checkpointed.
      nonfinite="skip", max_param_norm_ratio=2.0, max_bad_streak=20)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "official"
  if preset not in PRESETS:
    raise field_error("preset", f"unknown preset {preset!r}", PRESETS)
  c = _base()
  c.preset = preset
  if preset == "official":
    # Official SofT-GRPO-deepscaler-8k.sh: prompt 1024, response 8192, rollout T 1,
    # top-k 5 / top-p 0.95 in both phases; kl_loss_coef 0.001 (all five official scripts).
    # verl's loss: token-mean over each micro-batch of 2 rows per GPU / accumulation steps.
    c.grpo.max_prompt_len = 1024
    c.rollout.max_new_tokens = 8192
    c.rollout.think_budget = 8192 - 64
    c.rollout.answer_top_k = 5
    c.rollout.answer_top_p = 0.95
    c.grpo.micro_batch_rows = 16      # memory only: official ppo_micro_batch_size_per_gpu 2 x 8
    c.loss.loss_agg = "token_mean_per_micro"
    c.loss.loss_agg_micro_rows = 2
  if preset == "cpu_small":
    # SmolLM2-135M rarely writes \boxed{}; its final number is scored instead, and 1- and
    # 2-digit sums at T=0.7 give a reward rate (~5-40%) that GRPO can learn from.
    c.task.ops = ("add",)
    c.task.digits = (1, 2)
    c.task.num_train = 512
    c.task.num_test = 64
    c.reward.check.answer_format = "last_number"
    c.reward.num_workers = 1
    c.rollout.temperature = 0.7
    c.rollout.answer_top_p = 0.95
    c.rollout.max_new_tokens = 48
    c.rollout.think_budget = 24
    c.grpo.group_size = 4
    c.grpo.prompts_per_step = 4
    c.grpo.mini_batch_prompts = 2
    c.grpo.max_prompt_len = 96
    c.grpo.prompt_len_bucket = 16     # the arithmetic prompts are 74-76 tokens: width 80
    # 135M params move visibly in a few steps only with a larger LR than the 7B runs.
    c.optim.learning_rate = 2e-5
    c.run.num_steps = 10
    c.run.checkpoint_every = 4
    c.run.eval_problems = 16
    c.run.eval_n = 4
  elif preset == "test":
    c.model.name = "tiny"
    c.task.prompt = "bare"
    c.task.ops = ("add",)
    c.task.digits = (1,)
    c.task.num_train = 24
    c.task.num_test = 8
    c.reward.check.answer_format = "last_number"
    c.reward.num_workers = 1          # the worker path, as everywhere (issue 12 item 4)
    c.rollout.max_new_tokens = 16
    c.rollout.think_budget = 6
    c.grpo.group_size = 2
    c.grpo.prompts_per_step = 4
    c.grpo.mini_batch_prompts = 2
    c.grpo.max_prompt_len = 24
    c.optim.learning_rate = 1e-3
    c.run.num_steps = 2
    c.run.checkpoint_every = 1
    c.run.eval_problems = 4
    c.run.eval_n = 2
    c.run.progress = False
  return c
