#!/usr/bin/env bash
# Scaled-down SofT-GRPO vs GRPO reproduction with error bars (issue 11), ~90 min on 2 CPU cores.
#
#   bash experiments/repro/soft_grpo_passk.sh [OUT_DIR]     (default runs/softgrpo_repro2)
#   python -m experiments.passk_report OUT_DIR               (tables with 95% CIs, PNG plots)
#
# SmolLM2-135M-Instruct (embedded GGUF), preset cpu_small (1-2 digit addition, last number
# scored, 48 response tokens, think budget 24, T 0.7), with a gentle learning rate and group 8:
# 12 steps x 4 prompts x group 8, lr LR (default 5e-6), seeds SEEDS (default "0 1") per method.
# Evaluation: the 64 held-out test problems, n = 32 samples each, evaluation seed 0 for every
# policy (common random numbers, so paired differences have less noise); GRPO and the base model
# sample discretely, SofT-GRPO and the base model also with soft_gumbel thinking at tau 0.5.
# Order: the base model (discrete), then seed by seed (train both methods, evaluate both; the
# base model with soft thinking after the first seed), so a run cut short holds complete seeds. Finished pieces are skipped when the script is rerun.
set -euo pipefail
OUT=${1:-runs/softgrpo_repro2}
PY=${PY:-.venv/bin/python}
LR=${LR:-5e-6}
STEPS=${STEPS:-12}
SEEDS=${SEEDS:-"0 1"}
NPROB=${NPROB:-64}
mkdir -p "$OUT"
EV="--n=32 --k=1,2,4,8,16,32 --num_problems=$NPROB --preset=cpu_small --seed=0 --rows_per_call=128"
TRAIN="--config=experiments/configs/soft_grpo.py:cpu_small --config.optim.learning_rate=$LR
  --config.run.num_steps=$STEPS --config.run.checkpoint_every=$STEPS --config.run.keep_checkpoints=1
  --config.grpo.group_size=8 --config.grpo.prompts_per_step=4 --config.grpo.mini_batch_prompts=2"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

evaluate() {  # model mode out
  if [[ -f "$3" ]]; then log "skip $3 (exists)"; return; fi
  log "eval $1 $2 -> $3"
  $PY -m experiments.eval_passk --model="$1" --mode="$2" $EV --out="$3" >> "$OUT/log.txt" 2>&1
}
train() {  # mode seed workdir
  if [[ -f "$3/done" ]]; then log "skip $3 (done)"; return; fi
  log "train $1 seed $2 -> $3"
  $PY -m experiments.soft_grpo $TRAIN --config.rollout.mode="$1" --config.seed="$2" \
      --config.run.progress=False --workdir="$3" >> "$OUT/log.txt" 2>&1
  touch "$3/done"
}

log "start: lr $LR, $STEPS steps, seeds $SEEDS, $NPROB problems"
evaluate smollm2-135m discrete    "$OUT/eval_base_discrete.json"
first=1
for s in $SEEDS; do
  train discrete    "$s" "$OUT/train_grpo_s$s"
  train soft_gumbel "$s" "$OUT/train_softgrpo_s$s"
  evaluate "$OUT/train_grpo_s$s"     discrete    "$OUT/eval_grpo_s$s.json"
  evaluate "$OUT/train_softgrpo_s$s" soft_gumbel "$OUT/eval_softgrpo_s$s.json"
  if [[ $first == 1 ]]; then   # the base model with soft thinking: a reference, not a method
    evaluate smollm2-135m soft_gumbel "$OUT/eval_base_soft_gumbel.json"
    first=0
  fi
done
log "done"
