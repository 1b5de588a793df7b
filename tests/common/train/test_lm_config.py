"""LMConfig: the flat ls_lm ConfigDict maps onto one frozen dataclass per section; every bad
value is one line, `<section>.<field>: what is wrong; allowed: ...`."""

from __future__ import annotations

import dataclasses

import pytest

from common.train.lm_config import LMConfig
from experiments.configs import ls_lm


@pytest.mark.parametrize("field,value,match", [
    ("attention", "flash", r"^model\.attention: got 'flash'; allowed: 'ls', 'mhsa'$"),
    ("stabilizer", "magic", r"^model\.stabilizer: got 'magic'; allowed: 'none', "),
    ("num_local_heads", 3, r"^model\.num_local_heads: 3 is outside 0\.\.num_heads=2; "
                           r"allowed: 0\.\.num_heads$"),
    ("num_layers", 0, r"^model\.num_layers: got 0; allowed: a positive int <= 1024$"),
    ("seq_len", 64, r"^data\.seq_len: 64 does not fit the learned positions "
                    r"\(model\.max_position_embeddings=16\); allowed: <= 16$"),
    ("data", "/no/such/corpus", r"^data\.data: no such corpus path '/no/such/corpus'; "),
    ("nonfinite", "ignore", r"^loop\.nonfinite: got 'ignore'; allowed: 'skip', 'stop'$"),
    ("max_param_norm_ratio", 1.0,
     r"^loop\.max_param_norm_ratio: 1\.0; allowed: a finite number > 1$"),
    ("max_bad_streak", 0, r"^loop\.max_bad_streak: 0; allowed: >= 1$"),
    ("stats_every", -1, r"^loop\.stats_every: got -1; allowed: an int >= 0"),
    ("b2", 1.0, r"^optim\.b2: got 1\.0; allowed: \[0, 1\)$"),
    ("warmup_steps", 11, r"^optim\.warmup_steps: 11 > loop\.num_steps=10; allowed: 0\.\.num_steps$"),
    ("spike_ema_decay", 1.5, r"^step\.spike_ema_decay: got 1\.5; allowed: \[0, 1\)$"),
    ("mesh_fsdp", 0, r"^mesh\.mesh_fsdp: got 0; allowed: a positive int or -1$"),
])
def test_bad_config_values_are_one_line_errors(field, value, match):
  c = ls_lm.get_config("test")
  c[field] = value
  with pytest.raises(ValueError, match=match) as e:
    LMConfig.from_config_dict(c)
  assert "\n" not in str(e.value)


def test_all_local_heads_is_allowed_as_in_model_config():
  # One rule for num_local_heads (common/config.py): 0..num_heads, all-local included.
  c = ls_lm.get_config("test")
  c.num_local_heads = c.num_heads
  assert LMConfig.from_config_dict(c).model_config(258).num_local_heads == c.num_heads


def test_sections_are_frozen_and_cover_every_field():
  for preset in ls_lm.PRESETS:
    c = ls_lm.get_config(preset)
    lc = LMConfig.from_config_dict(c)
    flat = lc.to_dict()
    assert set(flat) == set(c.to_dict())
    assert flat["lr"] == c.lr and flat["num_steps"] == c.num_steps
  with pytest.raises(dataclasses.FrozenInstanceError):
    lc.optim.lr = 1.0
  with pytest.raises(ValueError, match=r"^config\.bogus: unknown field"):
    LMConfig.from_config_dict(dict(ls_lm.get_config("test").to_dict(), bogus=1))


def test_unknown_preset_is_a_one_line_error():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    ls_lm.get_config("huge")


def test_val_fraction_zero_names_the_validation_split():
  """Issue 12 row 11: val_fraction=0 says it is the validation split that would be empty."""
  c = ls_lm.get_config("test")
  c.val_fraction = 0.0
  with pytest.raises(ValueError, match=r"^data\.val_fraction: got 0\.0; allowed: \(0, 1\): the "
                                       r"share of documents held out for the validation split"):
    LMConfig.from_config_dict(c)
