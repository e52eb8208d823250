#!/usr/bin/env bash
# MARK on split Fashion-MNIST against fine-tune, EWC, XdG + SI and metagate, and MARK's ablations, 3 seeds.
# One budget for all: the same stream (5 tasks x 2 classes, 1800 training / 200 validation / 1000 test images
# per task) and the same passes over each task's data: 6 epochs for the baselines, MARK 2 epochs per phase
# (features, masks, final = 6 passes; the first task adds 2 for the KB's pre-training, kb_update=sgd adds 2).
# Usage: bash experiments/mark_split_fmnist.sh OUT   (about 25 minutes on one CPU thread)
set -euo pipefail
OUT=${1:-runs/mark-split-fmnist}
PY=${PYTHON:-python}
CAPS="benchmark.train_per_task=2000 benchmark.test_per_task=1000"
$PY -m metagate.cli compare split-fmnist $CAPS trainer.epochs=6 trainer.progress=false \
  --methods finetune,ewc,xdg-si=xdg,metagate --seeds 3 --out "$OUT/baselines" --resume
$PY -m metagate.cli compare mark-split-fmnist $CAPS trainer.progress=false \
  --methods mark,mark-code-sign=mark,mark-no-meta=mark,mark-no-masks=mark,mark-kb-frozen=mark \
  mark-code-sign:method.meta_direction=away mark-no-meta:method.kb_update=sgd \
  mark-no-masks:method.masks=false mark-kb-frozen:method.freeze_kb_after=1 \
  --seeds 3 --out "$OUT/mark" --resume
# The meta step's direction with a 100x larger step on D (outer_lr 0.1; weight decay 0.001 keeps the code's
# lr x decay = 1e-4): does moving toward (the paper) or against (the code) the mini-tasks' changes matter? 2 seeds.
$PY -m metagate.cli compare mark-split-fmnist $CAPS trainer.progress=false method.outer_lr=0.1 method.meta_weight_decay=0.001 \
  --methods mark-100x=mark,mark-100x-code-sign=mark mark-100x-code-sign:method.meta_direction=away \
  --seeds 2 --out "$OUT/direction" --resume
