#!/usr/bin/env bash
# The GPU check, run once per session on a lent CUDA machine (repo root; results under $OUT):
#   1. the hypermask / hnet speed benchmark at the paper's sizes, alone on the GPU;
#   2. in parallel: the CUDA tests (tests/test_cuda.py and the CLI's device tests); HyperMask and hnet on split
#      Fashion-MNIST at the official code's full schedule (5 x 2000 iterations), 3 seeds, task given and (HyperMask)
#      inferred by entropy; HyperMask at the permuted paper sizes (10 tasks, 205.6M-parameter hypernetwork) at
#      PERMUTED_ITERS iterations per task, 3 seeds; XdG + SI at its paper size (xdg-paper) and metagate at the
#      same size, seed 0.
# Every job has a deadline (JOB_SECONDS), so the script ends inside the device call's limit; results.json,
# metrics.jsonl and config.yaml of every run come back as one archive (checkpoints off: the paper-size
# hypernetwork's would be 3 GB per task).
# Needs: Fashion-MNIST under $METAGATE_DATA (default .data), pydantic importable (the device image lacks it: the
# session installs the wheels first).
set -uo pipefail
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
JOB_SECONDS=${JOB_SECONDS:-240}
JOBS=${JOBS:-all}  # all, or "split-permuted": HyperMask split (given, entropy) and permuted only
PERMUTED_ITERS=${PERMUTED_ITERS:-700}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script (nothing finishes in time)
mkdir -p "$OUT" runs/gpu
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 METAGATE_DATA=${METAGATE_DATA:-.data}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/nvidia-smi.txt"

echo "== speed (alone) $(date +%T)"
timeout "${SPEED_SECONDS:-90}" $PY benchmarks/hypermask_speed.py --device "$DEVICE" --iters 10 > "$OUT/speed.txt" 2>&1
cat "$OUT/speed.txt"

echo "== parallel jobs $(date +%T)"
run() {  # run NAME CONFIG OVERRIDES...: one training run in the background, its log under runs/gpu/logs
  local name=$1; shift
  mkdir -p runs/gpu/logs
  timeout "$JOB_SECONDS" $PY -m metagate.cli run "$@" trainer.device="$DEVICE" trainer.checkpoint=false trainer.progress=false \
    trainer.threads=1 --out "runs/gpu/$name" > "runs/gpu/logs/$name.log" 2>&1 &
}
timeout "$JOB_SECONDS" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cli.py -k "cuda or device" > "$OUT/cuda_tests.txt" 2>&1 &
for seed in 0 1 2; do
  run "hypermask-split-given-s$seed" hypermask-split-fmnist seed=$seed
  run "hypermask-split-entropy-s$seed" hypermask-split-fmnist seed=$seed method.task_inference=entropy
  [ "$JOBS" = all ] && run "hnet-split-given-s$seed" hnet-split-fmnist seed=$seed
  run "hypermask-permuted-paper-s$seed" hypermask-permuted-paper seed=$seed trainer.iterations_per_task=$PERMUTED_ITERS
done
if [ "$JOBS" = all ]; then
  run xdg-paper-s0 xdg-paper seed=0
  run metagate-paper-s0 xdg-paper seed=0 method.name=metagate 'method.backbone.hidden=[2000,2000]' method.backbone.dropout=0.5
fi
wait
echo "== done $(date +%T)"
tail -3 "$OUT/cuda_tests.txt"
for d in runs/gpu/*/; do
  [ "$(basename "$d")" = logs ] && continue
  [ -f "$d/results.json" ] && echo "finished: $d" || echo "UNFINISHED: $d ($(tail -c 300 "runs/gpu/logs/$(basename "$d").log" | tr '\n' ' '))"
done
tar czf "$OUT/gpu_runs.tgz" --exclude=checkpoints runs/gpu
