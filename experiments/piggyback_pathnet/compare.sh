#!/bin/sh
# Piggyback and PathNet against XdG + SI, HyperMask, metagate and fine-tuning on split and permuted Fashion-MNIST,
# 3 seeds, the same reduced budget for every method (split.yaml / permuted.yaml: 3000 training images a task,
# 4 epochs of batch 128, MLP 2x256, one CPU thread). Every method at its defaults (paper / code) except:
#   piggyback: lr_mask, lr_classifier and pathnet: generations, lr chosen on validation (tuning seeds 1000-1001,
#     the grids below; the paper's 1e-4 assumes 30 epochs, HAT's 20 generations 400 epochs),
#     pathnet evals_per_path=2 (HAT: 10) so that its rounds fit the budget;
#   hypermask on split: the code's split-MNIST values (configs/hypermask-split-fmnist.yaml);
#   xdg on permuted: c=30, no input dropout (configs/xdg-small.yaml, chosen on validation for XdG + SI there).
# Usage: sh experiments/piggyback_pathnet/compare.sh OUT   (then python experiments/piggyback_pathnet/summarize.py OUT/split)
set -e
OUT=${1:-runs/piggyback_pathnet}
MG="nice -n 15 env PYTHONPATH=src OMP_NUM_THREADS=1 ${PYTHON:-python} -m metagate.cli"
for s in split permuted; do
  $MG tune experiments/piggyback_pathnet/$s.yaml --methods piggyback,pathnet \
    --grid piggyback:method.lr_mask=0.0001,0.001,0.01 --grid piggyback:method.lr_classifier=0.0001,0.001 \
    --grid pathnet:method.generations=2,5,10 --grid pathnet:method.lr=0.05,0.01 pathnet:method.evals_per_path=2 \
    --tuning-seeds 2 --choose-only --out $OUT/tune-$s
done
# the values chosen there (tune-*/tuning.json), written out:
$MG compare experiments/piggyback_pathnet/split.yaml trainer.curve_every=11 \
  --methods finetune,xdg-si=xdg,hypermask,metagate,piggyback,pathnet --seeds 3 --out $OUT/split \
  hypermask:method.embedding_dim=128 "hypermask:method.hnet_hidden=[25,25]" hypermask:method.beta=0.001 \
  hypermask:method.sparsity=30 hypermask:method.augment=crop \
  piggyback:method.lr_mask=0.01 piggyback:method.lr_classifier=0.001 \
  pathnet:method.generations=5 pathnet:method.lr=0.05 pathnet:method.evals_per_path=2
$MG compare experiments/piggyback_pathnet/permuted.yaml trainer.curve_every=11 \
  --methods finetune,xdg-si=xdg,hypermask,metagate,piggyback,pathnet --seeds 3 --out $OUT/permuted \
  xdg-si:method.c=30 xdg-si:method.input_dropout=0.0 \
  piggyback:method.lr_mask=0.001 piggyback:method.lr_classifier=0.001 \
  pathnet:method.generations=5 pathnet:method.lr=0.05 pathnet:method.evals_per_path=2
