"""Greedy generation from SmolLM2-135M equals HF `generate` token for token.

Both sides load the same GGUF (dequantized to float32), use the same left-padded batch of 4
chat prompts of different lengths, and stop rows at EOS."""

import numpy as np

from common.sampler import SamplingConfig, generate, trim

QUESTIONS = ["What is 17 + 25?", "Name three primary colors.",
             "Write one short sentence about the sea, please.", "Hi"]


def test_greedy_32_tokens_match_hf_generate(smollm2):
  import torch

  tok = smollm2.tokenizer
  prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
  assert len({len(p) for p in prompts}) > 1  # really exercises left padding
  eos = tok.eos_id
  ours = trim(generate(smollm2.model, prompts,
                       SamplingConfig(max_new_tokens=32, greedy=True, eos_ids=(eos,))))

  width = max(len(p) for p in prompts)
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = smollm2.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
                                    do_sample=False, eos_token_id=eos, pad_token_id=0)
  theirs = []
  for row in out[:, width:].tolist():
    cut = row.index(eos) + 1 if eos in row else len(row)
    theirs.append(row[:cut])
  for q, a, b in zip(QUESTIONS, ours, theirs):
    assert a == b, (q, tok.decode(a), tok.decode(b))
  assert sum(len(r) for r in ours) > 40  # not trivially empty answers
