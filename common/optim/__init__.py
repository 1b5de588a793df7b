"""The optimizer factory (AdamW with warm-up + cosine or constant lr, AdaGC, non-finite skip)."""

from common.optim.adagc import AdaGCState, adagc
from common.optim.optimizer import decay_matrices, make_optimizer, warmup_cosine_schedule
