"""LS-attention language-model experiments (issue 4), read by experiments/train_lm.py.

  python -m experiments.train_lm --config=experiments/configs/ls_lm.py:<preset> \
      --config.attention=ls|mhsa --config.stabilizer=none|qk_norm|z_loss|adagc|softcap \
      --workdir=runs/x

Presets:
  paper_v1   6 layers, d 192, 6 heads x 32 (5 local : 1 global, window 50), seq 2048,
             batch 128 x accumulation 2, AdamW 6e-4 (0.9, 0.95), wd 0.1, clip 1.0,
             warmup 2000, cosine to 6e-5, learned absolute positions, SentencePiece 10K.
  paper_v2   12 layers, d 768, 12 heads x 64 (11 : 1, window 100), seq 8192.
  cpu_small  shows the effect in minutes on 2 CPU cores: 4 layers, d 128, 4 heads x 32
             (3 local : 1 global, window 16), byte tokens, seq 128, batch 16, 160 steps,
             lr 3e-3 (the "high" learning rate of EXPERIMENTS.md is --config.lr=2e-2).
  test       tiny; for the test-suite (seconds).

Memory: paper presets rematerialise every block (`remat="full"`, see benchmarks/RESULTS.md for
the measured peaks); the LM loss never builds [B, T, V] logits (`loss_chunk_tokens`); before the
first step the trainer compiles the step and refuses a `batch_size` that cannot fit
(`memory_check`, `memory_limit_gb`).

`batch_size` is the global micro-batch (sequences per forward/backward, over all devices);
one optimizer step consumes `batch_size * grad_accum` sequences.
The MLP is the shared decoder's SwiGLU with mlp_dim = 4 * d_model (the paper uses a GELU MLP
of the same width; the attention comparison does not depend on it).
"""

from __future__ import annotations

import ml_collections

from common.config import field_error

PRESETS = ("paper_v1", "paper_v2", "cpu_small", "test")


def _base() -> ml_collections.ConfigDict:
  """Flat fields, grouped by section: common.train.lm_config maps each block onto one frozen
  dataclass (model, data, optim, step, mesh, loop) that validates it."""
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0
  # --- model ---
  c.attention = "ls"            # "ls" | "mhsa"
  c.stabilizer = "none"         # "none" | "qk_norm" | "z_loss" | "adagc" | "softcap"
  c.num_layers = 6
  c.d_model = 192
  c.num_heads = 6
  c.head_dim = 32
  c.mlp_dim = 768
  c.num_local_heads = 5         # LS only: heads restricted to the sliding window
  c.window = 50                 # LS only: local window (keys i-window+1 .. i)
  c.position_embedding = "learned"
  c.max_position_embeddings = 2048
  c.compute_dtype = "float32"   # "bfloat16" for bf16 activations (params stay float32)
  c.attention_impl = "auto"
  c.softcap = 50.0              # used when stabilizer == "softcap": cap * tanh(logit / cap) (Gemma 2)
  c.remat = "full"              # memory: "none" | "dots" | "full": rematerialise each block
  # --- step ---
  c.loss_chunk_tokens = 4096    # LM head + cross-entropy over chunks of this many tokens
  # --- loop: memory (issue 15) ---
  c.memory_check = True         # compile the step first; refuse a micro-batch that cannot fit
  c.memory_limit_gb = 0.0       # the memory the check compares with; 0: the device's
  # --- data ---
  c.data = "stdlib"             # "stdlib" | "synthetic" | a path (text file/folder, HF dataset, ArrayRecord)
  c.tokenizer = "byte"          # "byte" | "sentencepiece" | path to a HF tokenizer.json
  c.vocab_size = 10_000         # SentencePiece vocab; for the synthetic source, its alphabet
  c.synthetic_order = 3         # synthetic k-th order Markov chain: dependency range k
  c.val_fraction = 0.05         # documents (by id hash) held out for validation
  c.seq_len = 2048
  c.batch_size = 128
  c.grad_accum = 2
  c.eval_batches = 8
  c.data_workers = 0
  # --- optim ---
  c.lr = 6e-4
  c.min_lr = 6e-5
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.warmup_steps = 2000
  c.adagc_beta = 0.98           # AdaGC (stabilizer == "adagc"): EMA decay of each tensor's grad norm
  c.adagc_lambda = 1.05         # AdaGC: clip to lambda x EMA norm
  c.adagc_warmup_steps = 100    # AdaGC: global-norm clipping while the EMA warms up
  # --- step ---
  c.z_loss_coef = 1e-4          # used when stabilizer == "z_loss": coef * mean(lse^2)
  c.spike_threshold = 0.5       # loss more than this (nats) above its EMA is a spike
  c.spike_ema_decay = 0.95
  c.inject_nan_at_step = -1     # test hook: the loss of this step (0-based) is made NaN
  # --- mesh ---
  c.mesh_data = -1              # -1: all devices not used by fsdp
  c.mesh_fsdp = 1
  c.mesh_tensor = 1             # tensor parallelism (heads / hidden units / vocab split)
  c.fsdp_min_size = 2**14       # leaves smaller than this stay replicated
  # --- loop ---
  c.num_steps = 20_000
  c.log_every = 50
  c.stats_every = 0             # steps with the attention-stats pass (max |logit|); 0: log_every
  c.eval_every = 1000
  c.ckpt_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.nonfinite = "skip"          # "skip" the update or "stop" the run
  c.max_param_norm_ratio = 2.0  # an update growing |params| more than this is treated as bad
  c.max_bad_streak = 20         # this many bad updates in a row stop the run even on "skip"
  c.progress = True
  c.tensorboard = True
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "cpu_small"
  if preset not in PRESETS:
    raise field_error("preset", f"unknown preset {preset!r}", PRESETS)
  c = _base()
  c.preset = preset
  if preset == "paper_v1":
    c.tokenizer = "sentencepiece"
  elif preset == "paper_v2":
    c.update(num_layers=12, d_model=768, num_heads=12, head_dim=64, mlp_dim=3072,
             num_local_heads=11, window=100, seq_len=8192, max_position_embeddings=8192,
             tokenizer="sentencepiece")
  elif preset == "cpu_small":
    c.update(num_layers=4, d_model=128, num_heads=4, head_dim=32, mlp_dim=512,
             num_local_heads=3, window=16, seq_len=128, max_position_embeddings=128,
             tokenizer="byte", vocab_size=16, batch_size=16, grad_accum=1, eval_batches=8,
             lr=3e-3, min_lr=3e-4, warmup_steps=16, num_steps=160, log_every=10,
             eval_every=40, ckpt_every=80, fsdp_min_size=2**14, adagc_warmup_steps=16,
             remat="none")
  elif preset == "test":
    c.update(num_layers=2, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
             num_local_heads=1, window=4, seq_len=16, max_position_embeddings=16,
             tokenizer="byte", vocab_size=32, batch_size=8, grad_accum=2, eval_batches=2,
             lr=3e-3, min_lr=3e-4, warmup_steps=2, num_steps=10, log_every=1, eval_every=5,
             ckpt_every=2, keep_checkpoints=2, fsdp_min_size=256, async_checkpoint=False,
             progress=False, tensorboard=True, adagc_warmup_steps=2, remat="none")
  return c
