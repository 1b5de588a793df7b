"""Optimizers for the LM experiments: AdamW with warm-up + cosine, AdaGC, non-finite skip."""

from common.optim.adagc import AdaGCState, adagc
from common.optim.optimizer import (SkipNonFiniteState, decay_matrices, make_optimizer,
                                    skip_nonfinite)
from common.optim.schedules import warmup_cosine_schedule
