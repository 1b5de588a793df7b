"""SofT-GRPO (arXiv 2511.06411): soft-thinking rollouts with Gumbel noise + GRPO.

Functional core (pure functions on arrays, `algorithm.py` for the update); the rollout
and the loop (`learner.train` / `learner.evaluate`) are the shells.
"""

from soft_grpo.advantages import broadcast_to_tokens, group_advantages
from soft_grpo.answer_check import STATUSES, AnswerCheckConfig
from soft_grpo.config import Config, GRPOConfig, ModelSpec, OptimConfig, RunConfig
from soft_grpo.logprob import (
    dirichlet_soft_logprob,
    gaussian_soft_logprob,
    gumbel_soft_logprob,
    token_entropy,
    token_logprob,
)
from soft_grpo.loss import (
    KL_FNS,
    POLICY_LOSS_FNS,
    LossConfig,
    grpo_loss,
    k3_kl,
    masked_token_mean,
    ppo_dual_clip_loss,
)
from soft_grpo.modes import (
    MODES,
    Mode,
    action_logprobs,
    get_mode,
    mixture_weights,
    rebuild_soft_inputs,
    soft_thinking_step,
)
from soft_grpo.pass_at_k import (
    markdown_table,
    max_over_first_k,
    mean_at_n,
    parse_ks,
    pass_at_k,
    summarize,
)
from soft_grpo.prompts import PROMPT_STYLES, PROMPT_SUFFIX, build_prompt, format_prompt
from soft_grpo.rewards import (
    RewardConfig,
    RewardScorer,
    count_statuses,
    score_response,
)
from soft_grpo.soft_token import (
    SoftStep,
    discrete_step,
    entropy_from_logits,
    filter_top_k_top_p,
    gumbel_noise,
    gumbel_noise_unclamped,
    is_discrete_action,
    mix_embeddings,
    one_hot_action,
)
from soft_grpo.tasks import (
    TaskConfig,
    arithmetic_splits,
    load_jsonl,
    load_parquet,
    load_splits,
    load_tasks,
)
