#!/usr/bin/env bash
# Issue 13, cost: does metagate keep its quality with fewer agent updates? On the 50-task composed stream with the
# benchmark's metagate settings (experiments/metagate_benchmarks.py's metagate-repel row, prior chosen on
# validation), each variant of (agent_every, consolidation_steps, agent_lr) on the tuning seeds (validation split
# reported in results.json: val_acc, val_bwt); the variants run in parallel, P at a time (one torch thread each).
#   [EXTRA="key=value ..."] bash experiments/agent_budget_probe.sh OUT [P]   (EXTRA: overrides for every run)
# Then: metagate aggregate OUT/* --last 10   (val_acc, val BWT; choose on val_acc; report test on fresh seeds)
# benchmarks/metagate_cost.py --only components method.agent_every=K method.consolidation_steps=S prints each one's cost.
set -uo pipefail
OUT=${1:?usage: agent_budget_probe.sh OUT [P]}; P=${2:-2}
PY=${PY:-python3}
SEEDS=${SEEDS:-"1000 1001"}
# label agent_every consolidation_steps agent_lr
VARIANTS=${VARIANTS:-"k1-s300-lr1e-3:1:300:0.001 k8-s25-lr1e-3:8:25:0.001 k8-s25-lr3e-3:8:25:0.003 k8-s50-lr3e-3:8:50:0.003 k16-s25-lr3e-3:16:25:0.003 k16-s25-lr1e-2:16:25:0.01"}
export PYTHONPATH=src:${PYTHONPATH:-} OMP_NUM_THREADS=1 EXTRA=${EXTRA:-}
jobs=()
for v in $VARIANTS; do
  IFS=: read -r label k s lr <<< "$v"
  for seed in $SEEDS; do
    jobs+=("$label $seed $k $s $lr")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P "$P" -L 1 bash -c '
  label=$0 seed=$1 k=$2 s=$3 lr=$4
  [ -f "'"$OUT"'/$label/seed$seed/results.json" ] && exit 0
  mkdir -p "'"$OUT"'/$label"
  '"$PY"' -m metagate.cli run composed-teacher reference=null seed=$seed trainer.progress=false trainer.checkpoint=false trainer.threads=1 \
    method.name=metagate method.backbone.kind=mlp method.backbone.dropout=0.0 "method.backbone.hidden=[209]" trainer.curve_every=10 \
    method.density=0.158 method.agent=additive "method.agent_hidden=[64]" method.reg_batch=32 method.consolidation_batch=64 \
    method.c=0.1 method.xi=0.01 method.prior=1.0 method.prior_kind=repel \
    method.agent_every=$k method.consolidation_steps=$s method.agent_lr=$lr $EXTRA \
    --out "'"$OUT"'/$label/seed$seed" > "'"$OUT"'/$label/seed$seed.log" 2>&1 || echo "failed: $label seed $seed"
'
