#!/bin/sh
# Issue 30: the learning rates of HAT, PackNet, SupSup and WSN (and SupSup's one-shot inference sample count) chosen on
# validation (tuning seeds 1000-1001) at the shared reduced budget of experiments/gating-{permuted,split}.yaml (that of
# experiments/piggyback_pathnet: 3000 training images a task, 300 of them validation, 4 epochs of batch 128, MLP 2x256,
# one CPU thread). The code defaults assume far longer training (HAT: up to 200 epochs; SupSup: 1000 iterations;
# PackNet: 30 epochs from ImageNet weights), so each rate's grid holds the code's value and larger ones.
# Usage: PYTHON=.venv/bin/python sh experiments/gating/tune.sh OUT   (then the chosen values, tune-*/tuning.json, are written into the specs)
set -e
OUT=${1:-runs/gating}
MG="env PYTHONPATH=src OMP_NUM_THREADS=1 ${PYTHON:-python} -m metagate.cli"
for s in ${STREAMS:-permuted split}; do
  extra=""
  if [ $s = permuted ]; then
    extra="--grid supsup-oneshot:method.lr=0.001,0.01 --grid supsup-oneshot:method.inference_samples=1,16 supsup-oneshot:method.task_inference=oneshot"
    methods="hat,packnet,supsup,wsn,supsup-oneshot=supsup"
    seeds=1  # the permuted stream's runs are twice as long: one tuning seed (time on a loaded 2-core machine)
  else
    methods="hat,packnet,supsup,wsn"
    seeds=2
  fi
  $MG tune experiments/gating-$s.yaml --methods $methods \
    --grid hat:method.lr=0.05,0.1,0.2 --grid packnet:method.lr=0.001,0.01,0.05 \
    --grid supsup:method.lr=0.0001,0.001,0.01 --grid wsn:trainer.lr=0.001,0.003,0.01 $extra \
    --tuning-seeds $seeds --choose-only --out $OUT/tune-$s &
done
wait
