"""Language-model training pieces: pure train/eval steps, train state, sharding rules,
orbax checkpoints and metric writers. Used by experiments/train_lm.py; the checkpoint
wrapper is generic (any pytree + JSON extras) so other trainers reuse it."""
