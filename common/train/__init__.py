"""Training pieces: the one TrainState (LM and GRPO), pure LM train/eval steps,
orbax checkpoints and metric writers. Used by experiments/train_lm.py; the checkpoint
wrapper is generic (any pytree + JSON extras) so other trainers reuse it."""
