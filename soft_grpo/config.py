"""SofT-GRPO run configuration: one frozen dataclass per config section.

`experiments/configs/soft_grpo.py` returns an `ml_collections.ConfigDict` whose sections map
one to one onto these dataclasses (and onto the ones the modules own: `task` ->
`tasks.TaskConfig`, `reward` -> `rewards.RewardConfig` (`reward.check` ->
`answer_check.AnswerCheckConfig`), `rollout` -> `rollout.RolloutConfig`, `loss` ->
`loss.LossConfig`). `Config.from_config_dict` builds them; each validates itself once, with
the message style `<section>.<field>: what is wrong; allowed: ...` (`soft_grpo.validate`).
Tokenizer-dependent fields (the `</think>` pieces, EOS and pad ids) are filled in by
`Config.for_tokenizer`, which re-runs the rollout section's own checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from soft_grpo import validate as v
from soft_grpo.answer_check import AnswerCheckConfig
from soft_grpo.loss import LossConfig
from soft_grpo.prompts import think_end_ids
from soft_grpo.rewards import RewardConfig
from soft_grpo.rollout import RolloutConfig
from soft_grpo.tasks import TaskConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The `model` section: which policy to start from."""
  name: str = "smollm2-135m"    # embedded name, HF checkpoint dir, .gguf, or "tiny" (random)
  dtype: str = "float32"
  remat: str = "none"           # memory only: rematerialise each block in the update

  def __post_init__(self):
    v.require(isinstance(self.name, str) and bool(self.name), "model", "name", self.name,
              "'tiny', an embedded model name, an HF checkpoint dir or a .gguf file")
    v.check_choice("model", "dtype", self.dtype, DTYPES)
    from common.config import REMAT
    v.check_choice("model", "remat", self.remat, REMAT)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The `grpo` section: batch layout of one step (official verl actor defaults)."""
  group_size: int = 8
  prompts_per_step: int = 64
  mini_batch_prompts: int = 32        # 64 / 32 = two updates per step
  ppo_epochs: int = 1
  max_prompt_len: int = 256           # longest prompt allowed; the padded width's upper bound
  # 0: prompts are left-padded to max_prompt_len (one compile). B > 0: to the step's longest
  # prompt rounded up to a multiple of B (at most max_prompt_len): fewer padded positions, one
  # more compile of rollout, scoring and update per width that occurs.
  prompt_len_bucket: int = 0
  micro_batch_rows: int = 0           # 0 = whole mini-batch; else grad accumulation / chunks
  # Run each prompt once per group, not once per completion: the rollout's prefill and the
  # scoring/update forwards share the prompt's keys/values across the group's rows (exact; the
  # prompt is ~2/3 of a cpu_small row). Scoring/update keep the plain forward with model.remat
  # or LS-attention (`algorithm.shared_prompt_forward_applies`).
  share_prompt_prefix: bool = True

  def __post_init__(self):
    s = "grpo"
    v.require(v.is_int(self.group_size) and self.group_size >= 2, s, "group_size",
              self.group_size, "an int >= 2 (the group std needs two samples)")
    v.check_int(s, "prompts_per_step", self.prompts_per_step, 1)
    v.require(v.is_int(self.mini_batch_prompts) and self.mini_batch_prompts >= 1
              and self.prompts_per_step % self.mini_batch_prompts == 0, s,
              "mini_batch_prompts", self.mini_batch_prompts,
              f"a divisor of grpo.prompts_per_step={self.prompts_per_step}")
    v.check_int(s, "ppo_epochs", self.ppo_epochs, 1)
    v.check_int(s, "max_prompt_len", self.max_prompt_len, 1)
    v.check_int(s, "prompt_len_bucket", self.prompt_len_bucket, 0)
    v.require(isinstance(self.share_prompt_prefix, bool), s, "share_prompt_prefix",
              self.share_prompt_prefix, "True or False")
    v.require(v.is_int(self.micro_batch_rows) and self.micro_batch_rows >= 0 and (
        self.micro_batch_rows == 0 or self.rows_per_update % self.micro_batch_rows == 0), s,
        "micro_batch_rows", self.micro_batch_rows, f"0 or a divisor of mini_batch_prompts * "
        f"group_size = {self.rows_per_update}")

  def prompt_width(self, longest: int) -> int:
    """Padded prompt width for a batch whose longest prompt has `longest` tokens."""
    if not self.prompt_len_bucket:
      return self.max_prompt_len
    b = self.prompt_len_bucket
    return min(-(-longest // b) * b, self.max_prompt_len)

  @property
  def rows_per_step(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def rows_per_update(self) -> int:
    return self.mini_batch_prompts * self.group_size

  @property
  def num_micro_batches(self) -> int:
    return self.rows_per_update // self.micro_batch_rows if self.micro_batch_rows else 1

  @property
  def num_score_chunks(self) -> int:
    return self.rows_per_step // self.micro_batch_rows if self.micro_batch_rows else 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The `optim` section: grad-norm clip then AdamW at a constant LR (official verl actor)."""
  learning_rate: float = 1e-6
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    s = "optim"
    v.check_number(s, "learning_rate", self.learning_rate, 0.0, strict=True)
    v.check_number(s, "weight_decay", self.weight_decay, 0.0)
    v.check_number(s, "grad_clip", self.grad_clip, 0.0, strict=True)
    v.check_number(s, "b1", self.b1, 0.0, hi=1.0, hi_strict=True)
    v.check_number(s, "b2", self.b2, 0.0, hi=1.0, hi_strict=True)
    v.check_number(s, "eps", self.eps, 0.0, strict=True)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The `mesh` section: data x fsdp x tensor (-1 = the remaining devices). Checked, with the
  device count, by `common.sharding.make_mesh` (one rule, one place; same message style)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The `run` section: length, checkpoints, periodic evaluation, export, progress bar."""
  num_steps: int = 500
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  # True: checkpoints hold the policy parameters only (no optimizer state, no reference
  # policy; 1/4 of the size). Such a run folder is a model (generate --model=<workdir>) but
  # cannot resume: the AdamW moments are gone, and a resume refuses with one line.
  checkpoint_params_only: bool = False
  eval_every: int = 0                 # 0 = no periodic eval
  eval_problems: int = 64
  eval_n: int = 4
  eval_tau: float = 0.5               # Gumbel-softmax tau of every evaluation (soft modes;
                                      # official soft-thinking inference), not rollout.tau
  export: bool = False                # write the trained policy as an HF checkpoint at the end
  progress: bool = True
  # Bad updates (common/train/guard.py): non-finite loss / gradient / parameters, or |params|
  # growing more than max_param_norm_ratio in one update, are skipped ("skip") or stop the run
  # ("stop"); max_bad_streak bad steps in a row stop it anyway. Never checkpointed.
  nonfinite: str = "skip"
  max_param_norm_ratio: float = 2.0
  max_bad_streak: int = 20

  def __post_init__(self):
    s = "run"
    v.check_int(s, "num_steps", self.num_steps, 0)
    v.check_int(s, "checkpoint_every", self.checkpoint_every, 1)
    v.check_int(s, "keep_checkpoints", self.keep_checkpoints, 1)
    v.check_int(s, "eval_every", self.eval_every, 0)
    v.check_int(s, "eval_problems", self.eval_problems, 1)
    v.check_int(s, "eval_n", self.eval_n, 1)
    v.check_number(s, "eval_tau", self.eval_tau, 0.0, strict=True)
    v.require(isinstance(self.checkpoint_params_only, bool), s, "checkpoint_params_only",
              self.checkpoint_params_only, "True or False")
    v.require(isinstance(self.export, bool), s, "export", self.export, "True or False")
    v.require(isinstance(self.progress, bool), s, "progress", self.progress, "True or False")
    self.guard_config()   # nonfinite / max_param_norm_ratio / max_bad_streak

  def guard_config(self):
    from common.train.guard import GuardConfig
    return GuardConfig(nonfinite=self.nonfinite, max_param_norm_ratio=self.max_param_norm_ratio,
                       max_bad_streak=self.max_bad_streak, section="run")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run; hashable, so the jitted functions take it as a static argument."""
  rollout: RolloutConfig = RolloutConfig()
  loss: LossConfig = LossConfig()
  grpo: GRPOConfig = GRPOConfig()
  optim: OptimConfig = OptimConfig()
  model: ModelSpec = ModelSpec()
  task: TaskConfig = TaskConfig()
  reward: RewardConfig = RewardConfig()
  mesh: MeshConfig = MeshConfig()
  run: RunConfig = RunConfig()
  seed: int = 0
  preset: str = ""

  def __post_init__(self):
    v.require(v.is_int(self.seed), "config", "seed", self.seed, "an int")
    # The one cross-section rule: verl's micro-batches tile each update's rows.
    if self.loss.loss_agg == "token_mean_per_micro":
      v.require(self.grpo.rows_per_update % self.loss.loss_agg_micro_rows == 0, "loss",
                "loss_agg_micro_rows", self.loss.loss_agg_micro_rows,
                f"a divisor of grpo.mini_batch_prompts * grpo.group_size = "
                f"{self.grpo.rows_per_update}")

  def eval_rollout(self) -> RolloutConfig:
    """The rollout of evaluations: soft modes sample at `run.eval_tau`."""
    if not self.rollout.soft:
      return self.rollout
    return dataclasses.replace(self.rollout, tau=self.run.eval_tau)

  @classmethod
  def from_config_dict(cls, c: Mapping[str, Any]) -> "Config":
    """Builds (and so validates) every section of a config dict."""
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    sections = {"rollout": RolloutConfig, "loss": LossConfig, "grpo": GRPOConfig,
                "optim": OptimConfig, "model": ModelSpec, "task": TaskConfig,
                "mesh": MeshConfig, "run": RunConfig}
    known = set(sections) | {"reward", "seed", "preset"}
    for key in c:
      v.require(key in known, "config", key, c[key], str(sorted(known)),
                problem="unknown section")
    built = {name: v.section_from_mapping(cls_, name, c.get(name, {}))
             for name, cls_ in sections.items()}
    reward = dict(c.get("reward", {}))
    check = v.section_from_mapping(AnswerCheckConfig, "reward.check", reward.pop("check", {}))
    built["reward"] = v.section_from_mapping(RewardConfig, "reward", reward, check=check)
    return cls(**built, seed=c.get("seed", 0), preset=c.get("preset", ""))

  def for_tokenizer(self, tokenizer) -> "Config":
    """Fills the rollout's token ids from the tokenizer (explicit `think_end_ids` win)."""
    r = self.rollout
    eos = tuple(int(i) for i in (getattr(tokenizer, "eos_ids", ()) or ()))
    pad = getattr(tokenizer, "pad_id", None)
    rollout = dataclasses.replace(
        r, think_end_ids=r.think_end_ids or think_end_ids(tokenizer, r.think_end),
        eos_ids=eos, pad_id=int(pad if pad is not None else (eos[0] if eos else 0)))
    return dataclasses.replace(self, rollout=rollout)
