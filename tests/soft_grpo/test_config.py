"""Config sections -> frozen dataclasses: one-line errors in one style, presets valid."""

import dataclasses

import pytest

from common.tokenizer import ByteTokenizer
from experiments.configs.soft_grpo import get_config
from soft_grpo.config import Config


@pytest.mark.parametrize("section,field,value", [
    ("rollout", "mode", "hard"),
    ("rollout", "top_p", 1.5),
    ("rollout", "tau", 0.0),
    ("rollout", "think_budget", 99),
    ("grpo", "mini_batch_prompts", 3),
    ("grpo", "group_size", 1),
    ("optim", "learning_rate", float("nan")),
    ("optim", "grad_clip", 0.0),
    ("loss", "clip_ratio_c", 1.0),
    ("task", "prompt", "xml"),
    ("task", "source", "no/such/file.jsonl"),
    ("run", "num_steps", -1),
    ("run", "eval_tau", 0.0),
    ("loss", "loss_agg", "sum"),
    ("model", "dtype", "float8"),
    ("reward", "num_workers", 0),
])
def test_bad_field_is_a_one_line_error_naming_section_and_field(section, field, value):
  c = get_config("test")
  c[section][field] = value
  with pytest.raises(ValueError, match=rf"^{section}\.{field}: .*; allowed: ") as e:
    Config.from_config_dict(c)
  assert "\n" not in str(e.value)


def test_nested_and_unknown_fields():
  c = get_config("test")
  c.reward.check.answer_format = "xml"
  with pytest.raises(ValueError, match=r"^reward\.check\.answer_format: got 'xml'; allowed: "):
    Config.from_config_dict(c)
  c = get_config("test").to_dict()
  c["rollout"]["topk"] = 3
  with pytest.raises(ValueError, match=r"^rollout\.topk: unknown field; allowed: \["):
    Config.from_config_dict(c)
  c = get_config("test").to_dict()
  c["optimizer"] = {}
  with pytest.raises(ValueError, match=r"^config\.optimizer: unknown section; allowed: "):
    Config.from_config_dict(c)


def test_think_budget_rule_uses_the_think_end_pieces():
  """One rule, checked in `RolloutConfig`: think_budget <= max_new_tokens - len(pieces)."""
  c = get_config("test")          # max_new_tokens 16; "</think>" is 8 byte pieces
  c.rollout.think_budget = 15     # fine while the pieces are unknown (counted as one)
  cfg = Config.from_config_dict(c)
  with pytest.raises(ValueError, match=r"^rollout\.think_budget: got 15; allowed: .* = \[0, 8\]$"):
    cfg.for_tokenizer(ByteTokenizer())
  c.rollout.think_budget = 8
  filled = Config.from_config_dict(c).for_tokenizer(ByteTokenizer())
  assert filled.rollout.think_end_ids == tuple(ByteTokenizer().encode("</think>"))
  assert filled.rollout.eos_ids == (256,) and filled.rollout.pad_id == 257


@pytest.mark.parametrize("preset", ["official", "cpu_small", "test"])
def test_presets_validate(preset):
  cfg = Config.from_config_dict(get_config(preset))
  hash(cfg)                       # a static argument of the jitted update
  assert cfg.preset == preset and cfg.reward.num_workers >= 1
  # Issue 11: official answer-phase sampling and evaluation tau in every preset; the official
  # preset aggregates the loss as verl does.
  r = cfg.rollout
  assert (r.answer_top_k, r.answer_top_p, cfg.run.eval_tau) == (5, 0.95, 0.5)
  assert (cfg.loss.loss_agg, cfg.loss.loss_agg_micro_rows) == (
      ("token_mean_per_micro", 2) if preset == "official" else ("token_mean", 2))
  if preset == "official":
    assert (cfg.grpo.group_size, cfg.grpo.prompts_per_step, cfg.grpo.mini_batch_prompts) == (
        8, 64, 32)
    o = cfg.optim
    assert (o.learning_rate, o.weight_decay, o.grad_clip, cfg.loss.kl_coef) == (
        1e-6, 0.01, 1.0, 1e-3)
    r = cfg.rollout
    assert (r.top_k, r.top_p, r.tau, r.noise_factor) == (5, 0.95, 0.1, 1.0)
  assert dataclasses.asdict(cfg)["rollout"]["mode"] == "soft_gumbel"


def test_loss_agg_micro_rows_must_tile_the_update():
  c = get_config("test")                      # 2 prompts x group 2 = 4 rows per update
  c.loss.loss_agg, c.loss.loss_agg_micro_rows = "token_mean_per_micro", 3
  with pytest.raises(ValueError, match=r"^loss\.loss_agg_micro_rows: got 3; allowed: a divisor "
                     r"of grpo\.mini_batch_prompts \* grpo\.group_size = 4$"):
    Config.from_config_dict(c)
  c.loss.loss_agg = "token_mean"              # the rows only matter for verl's aggregation
  Config.from_config_dict(c)
