"""The LM run's config, validated once: the flat ls_lm ConfigDict -> one frozen dataclass per
section (the `# --- section ---` blocks of experiments/configs/ls_lm.py).

  model  -> ModelSection  (its rules are ModelConfig's, in common/config.py: checked there)
  data   -> DataSection
  optim  -> OptimSection  (-> common.optim.make_optimizer)
  step   -> lm_step.StepConfig (z-loss, spike detector, NaN test hook)
  mesh   -> MeshSection   (-> common.sharding.make_mesh)
  loop   -> LoopSection   (steps, logging, stats, eval, checkpoints, faults)

The ConfigDict stays flat so `--config.lr=...` keeps working; each key belongs to exactly one
section (its name is the section's field name). Every error has one style,
`<section>.<field>: what is wrong; allowed: ...` (`common.config.field_error`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from common.config import DTYPES as MODEL_DTYPES
from common.config import POSITION_EMBEDDINGS, ModelConfig, field_error
from common.train.lm_step import StepConfig

ATTENTIONS = ("ls", "mhsa")
STABILIZERS = ("none", "qk_norm", "z_loss", "adagc", "softcap")
NONFINITE = ("skip", "stop")
COMPUTE_DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("stdlib", "synthetic")
_PLACEHOLDER_VOCAB = 256   # the real vocab comes from the data; the model rules do not use it

assert set(COMPUTE_DTYPES) <= set(MODEL_DTYPES)


def _positive_int(section: str, obj, *names: str) -> None:
  for name in names:
    v = getattr(obj, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise field_error(f"{section}.{name}", f"got {v!r}", "a positive int")


def _number(section: str, obj, *names: str, low: float = 0.0) -> None:
  for name in names:
    v = getattr(obj, name)
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
        or v < low):
      raise field_error(f"{section}.{name}", f"got {v!r}", f"a finite number >= {low:g}")


def _one_of(path: str, value, allowed) -> None:
  if value not in allowed:
    raise field_error(path, f"got {value!r}", allowed)


@dataclasses.dataclass(frozen=True)
class ModelSection:
  attention: str
  stabilizer: str
  num_layers: int
  d_model: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_local_heads: int
  window: int
  position_embedding: str
  max_position_embeddings: int
  compute_dtype: str
  attention_impl: str
  softcap: float
  remat: str               # memory only: "none" | "dots" | "full" (common.config.REMAT)

  def __post_init__(self):
    _one_of("model.attention", self.attention, ATTENTIONS)
    _one_of("model.stabilizer", self.stabilizer, STABILIZERS)
    _one_of("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    _one_of("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
    if self.stabilizer == "softcap":
      _number("model", self, "softcap")
      if not self.softcap > 0:
        raise field_error("model.softcap", f"got {self.softcap!r} with stabilizer='softcap'",
                          "> 0")
    self.model_config(_PLACEHOLDER_VOCAB)   # ModelConfig's own rules, checked once, there

  def model_config(self, vocab_size: int) -> ModelConfig:
    """The decoder for this run; the stabilizers that live in attention are switched here."""
    ls = self.attention == "ls"
    return ModelConfig(
        vocab_size=vocab_size, d_model=self.d_model, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, position_embedding=self.position_embedding,
        max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
        attention=self.attention, num_local_heads=self.num_local_heads if ls else 0,
        window=self.window if ls else 0, qk_norm=self.stabilizer == "qk_norm",
        attn_logits_soft_cap=float(self.softcap) if self.stabilizer == "softcap" else None,
        attention_impl=self.attention_impl, dtype=self.compute_dtype, param_dtype="float32",
        remat=self.remat)


@dataclasses.dataclass(frozen=True)
class DataSection:
  data: str                # "stdlib" | "synthetic" | a corpus path
  tokenizer: str           # "byte" | "sentencepiece" | an HF tokenizer.json path
  vocab_size: int          # SentencePiece vocab; the synthetic source's alphabet
  synthetic_order: int
  val_fraction: float
  seq_len: int
  batch_size: int          # global micro-batch (sequences per forward/backward)
  grad_accum: int
  eval_batches: int
  data_workers: int

  def __post_init__(self):
    if self.data not in DATA_SOURCES and not os.path.exists(self.data):
      raise field_error("data.data", f"no such corpus path {self.data!r}",
                        "'stdlib', 'synthetic' or an existing file/folder")
    _positive_int("data", self, "seq_len", "batch_size", "grad_accum", "eval_batches")
    if self.data == "synthetic":
      _positive_int("data", self, "synthetic_order", "vocab_size")
    if not 0.0 < self.val_fraction < 1.0:
      raise field_error("data.val_fraction", f"got {self.val_fraction!r}",
                        "(0, 1): the share of documents held out for the validation split, "
                        "which every run evaluates on")
    if not isinstance(self.data_workers, int) or self.data_workers < 0:
      raise field_error("data.data_workers", f"got {self.data_workers!r}", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float
  min_lr: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float
  warmup_steps: int
  adagc_beta: float
  adagc_lambda: float
  adagc_warmup_steps: int

  def __post_init__(self):
    _number("optim", self, "lr", "min_lr", "weight_decay", "grad_clip")
    if not 0 < self.lr:
      raise field_error("optim.lr", f"got {self.lr!r}", "> 0")
    if self.min_lr > self.lr:
      raise field_error("optim.min_lr", f"{self.min_lr!r} > lr={self.lr!r}", "0..lr")
    for name in ("b1", "b2", "adagc_beta"):
      if not 0 <= getattr(self, name) < 1:
        raise field_error(f"optim.{name}", f"got {getattr(self, name)!r}", "[0, 1)")
    if not self.adagc_lambda > 0:
      raise field_error("optim.adagc_lambda", f"got {self.adagc_lambda!r}", "> 0")
    for name in ("warmup_steps", "adagc_warmup_steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise field_error(f"optim.{name}", f"got {getattr(self, name)!r}", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class MeshSection:
  mesh_data: int           # -1: all devices not used by fsdp
  mesh_fsdp: int
  mesh_tensor: int         # Megatron tensor parallelism (common.sharding name rules)
  fsdp_min_size: int       # leaves smaller than this stay replicated

  def __post_init__(self):
    for name in ("mesh_data", "mesh_fsdp", "mesh_tensor"):
      v = getattr(self, name)
      if not isinstance(v, int) or v == 0 or v < -1:
        raise field_error(f"mesh.{name}", f"got {v!r}", "a positive int or -1")
    _positive_int("mesh", self, "fsdp_min_size")


@dataclasses.dataclass(frozen=True)
class LoopSection:
  num_steps: int
  log_every: int
  stats_every: int         # attention-stats (max |logit|) steps; 0: every log_every steps
  eval_every: int
  ckpt_every: int
  keep_checkpoints: int
  async_checkpoint: bool
  nonfinite: str           # "skip" the update or "stop" the run
  max_param_norm_ratio: float  # an update growing |params| more than this is skipped/stops
  max_bad_streak: int      # this many skipped updates in a row stop the run
  progress: bool
  tensorboard: bool
  memory_check: bool       # compile the step first; refuse a micro-batch that cannot fit
  memory_limit_gb: float   # what the check compares with; 0: the device's memory

  def __post_init__(self):
    _positive_int("loop", self, "num_steps", "log_every", "eval_every", "ckpt_every",
                  "keep_checkpoints")
    if not isinstance(self.stats_every, int) or self.stats_every < 0:
      raise field_error("loop.stats_every", f"got {self.stats_every!r}",
                        "an int >= 0 (0: same as log_every)")
    _one_of("loop.nonfinite", self.nonfinite, NONFINITE)
    self.guard_config()   # GuardConfig checks max_param_norm_ratio / max_bad_streak
    _number("loop", self, "memory_limit_gb")

  def guard_config(self):
    from common.train.guard import GuardConfig
    return GuardConfig(nonfinite=self.nonfinite, max_param_norm_ratio=self.max_param_norm_ratio,
                       max_bad_streak=self.max_bad_streak, section="loop")


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
             "step": StepConfig, "mesh": MeshSection, "loop": LoopSection}
_TOP = ("seed", "preset")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  model: ModelSection
  data: DataSection
  optim: OptimSection
  step: StepConfig
  mesh: MeshSection
  loop: LoopSection
  seed: int = 0
  preset: str = ""

  def __post_init__(self):
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      raise field_error("config.seed", f"got {self.seed!r}", "an int")
    if self.optim.warmup_steps > self.loop.num_steps:
      raise field_error("optim.warmup_steps", f"{self.optim.warmup_steps} > "
                        f"loop.num_steps={self.loop.num_steps}", "0..num_steps")
    if (self.model.position_embedding == "learned"
        and self.data.seq_len > self.model.max_position_embeddings):
      raise field_error("data.seq_len", f"{self.data.seq_len} does not fit the learned "
                        f"positions (model.max_position_embeddings="
                        f"{self.model.max_position_embeddings})",
                        f"<= {self.model.max_position_embeddings}")

  @property
  def stabilizer(self) -> str:
    return self.model.stabilizer

  @classmethod
  def from_config_dict(cls, c) -> "LMConfig":
    """The flat ls_lm ConfigDict (or dict) -> LMConfig; unknown or missing keys are errors."""
    flat = dict(c.to_dict() if hasattr(c, "to_dict") else c)
    sections = {}
    for name, section_cls in _SECTIONS.items():
      fields = [f.name for f in dataclasses.fields(section_cls)]
      missing = [f for f in fields if f not in flat]
      if missing:
        raise field_error(f"config.{missing[0]}", f"missing (section {name})",
                          "every field of experiments/configs/ls_lm.py")
      sections[name] = {f: flat.pop(f) for f in fields}
    top = {k: flat.pop(k) for k in _TOP if k in flat}
    if flat:
      raise field_error(f"config.{sorted(flat)[0]}", "unknown field",
                        "the fields of experiments/configs/ls_lm.py")
    step = sections["step"]
    if sections["model"]["stabilizer"] != "z_loss":
      step = dict(step, z_loss_coef=0.0)      # z-loss only for stabilizer='z_loss'
    return cls(model=ModelSection(**sections["model"]), data=DataSection(**sections["data"]),
               optim=OptimSection(**sections["optim"]), step=StepConfig(**step),
               mesh=MeshSection(**sections["mesh"]), loop=LoopSection(**sections["loop"]),
               **top)

  def to_dict(self) -> dict[str, Any]:
    """Flat, as the ConfigDict it came from (written to <workdir>/config.json)."""
    out: dict[str, Any] = {"preset": self.preset, "seed": self.seed}
    for name in _SECTIONS:
      out.update(dataclasses.asdict(getattr(self, name)))
    return out

  def model_config(self, vocab_size: int) -> ModelConfig:
    return self.model.model_config(vocab_size)

  def make_optimizer(self):
    """(optimizer, lr schedule): AdamW with warm-up + cosine; global-norm clipping, or AdaGC
    in its place for stabilizer='adagc' (AdaGC replaces global clipping, Wang et al. 2025)."""
    from common.optim import make_optimizer
    o = self.optim
    return make_optimizer(
        lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
        total_steps=self.loop.num_steps, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
        grad_clip=o.grad_clip, adagc=self.stabilizer == "adagc", adagc_beta=o.adagc_beta,
        adagc_lambda=o.adagc_lambda, adagc_warmup_steps=o.adagc_warmup_steps)
