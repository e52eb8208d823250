#!/usr/bin/env bash
# The GPU check, run once per session on a lent CUDA machine (repo root; results under $OUT). JOBS, a comma list of
# groups (default tests,metagate,replay,gating), all run in parallel, each job with a deadline (JOB_SECONDS):
#   tests     the CUDA tests (tests/test_cuda.py: every method's step under sync-error mode, whole runs, exact
#             resume; the CLI's and trainer's device tests);
#   metagate  the default run on the GPU (metagate, XdG + SI, oracle: printed task by task), the cost benchmark's
#             default-run ratio on the GPU, and metagate (repel prior) + XdG + SI on the 50-task composed stream, seed 0;
#   replay    ER, DGR, MeRGAN on split Fashion-MNIST (seed 0), DGR at its paper size on Fashion-MNIST (MNIST is not here);
#   gating    Piggyback, PathNet, MARK on split Fashion-MNIST (seed 0), XdG + SI and metagate at XdG's paper size;
#   probe13   issue 13's cost probe on the machine's CPU cores (experiments/agent_budget_probe.sh): metagate with fewer
#             agent updates on the 50-task composed stream, validation (tuning seeds) and test (seeds 0-2, and the
#             shuffled-context control) at once, so that the validation choice is read off the same call;
#   hypermask session 3's set: the hypermask / hnet speed benchmark (alone, first), HyperMask and hnet on split
#             Fashion-MNIST at the official schedule, 3 seeds, HyperMask at the permuted paper sizes (PERMUTED_ITERS).
# results.json, metrics.jsonl and config.yaml of every run come back as one archive (checkpoints off: the paper-size
# hypernetwork's would be 3 GB per task); a run cut by its deadline is listed UNFINISHED with its last log line.
# Needs: Fashion-MNIST under $METAGATE_DATA (default .data), pydantic importable (the device image lacks it: the
# session installs the wheels first).
set -uo pipefail
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
JOB_SECONDS=${JOB_SECONDS:-240}
JOBS=,${JOBS:-tests,metagate,replay,gating},
PERMUTED_ITERS=${PERMUTED_ITERS:-700}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script (nothing finishes in time)
mkdir -p "$OUT" runs/gpu/logs
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 METAGATE_DATA=${METAGATE_DATA:-.data}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/nvidia-smi.txt"

has() { [[ "$JOBS" == *,$1,* ]]; }
if has hypermask; then
  echo "== speed (alone) $(date +%T)"
  timeout "${SPEED_SECONDS:-90}" $PY benchmarks/hypermask_speed.py --device "$DEVICE" --iters 10 > "$OUT/speed.txt" 2>&1
  cat "$OUT/speed.txt"
fi

echo "== parallel jobs $(date +%T)"
run() {  # run NAME CONFIG OVERRIDES...: one training run in the background, its log under runs/gpu/logs
  local name=$1; shift
  mkdir -p runs/gpu/logs
  timeout "$JOB_SECONDS" $PY -m metagate.cli run "$@" trainer.device="$DEVICE" trainer.checkpoint=false trainer.progress=false \
    trainer.threads=1 --out "runs/gpu/$name" > "runs/gpu/logs/$name.log" 2>&1 &
}
if has tests; then
  timeout "$JOB_SECONDS" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cli.py tests/test_trainer.py -k "cuda or device" > "$OUT/cuda_tests.txt" 2>&1 &
fi
if has metagate; then
  run default default
  timeout "$JOB_SECONDS" $PY benchmarks/metagate_cost.py --only default --repeats 2 trainer.device="$DEVICE" > "$OUT/cost.txt" 2>&1 &
  COMPOSED=(composed-teacher method.backbone.kind=mlp method.backbone.dropout=0.0 'method.backbone.hidden=[209]' trainer.curve_every=10 seed=0 reference=null)
  run composed-metagate-repel "${COMPOSED[@]}" method.name=metagate method.density=0.158 method.agent=additive 'method.agent_hidden=[64]' \
    method.reg_batch=32 method.consolidation_batch=64 method.c=0.1 method.xi=0.01 method.prior=1.0 method.prior_kind=repel
  run composed-xdg "${COMPOSED[@]}" method.name=xdg method.gate_fraction=0.842 method.input_dropout=0.0 method.c=0.1 method.xi=0.01
fi
if has replay; then
  for m in er dgr mergan; do run "$m-split-fmnist" "$m-split-fmnist" seed=0; done
  run dgr-paper-fmnist dgr-mnist-paper seed=0 benchmark.dataset=fashion_mnist
fi
if has gating; then
  for m in piggyback pathnet mark; do run "$m-split-fmnist" "$m-split-fmnist" seed=0; done
  run xdg-paper-s0 xdg-paper seed=0
  run metagate-paper-s0 xdg-paper seed=0 method.name=metagate 'method.backbone.hidden=[2000,2000]' method.backbone.dropout=0.5
fi
if has probe13; then
  P13=${P13:-"k1-s300-lr1e-3:1:300:0.001 k4-s100-lr1e-3:4:100:0.001 k8-s25-lr1e-3:8:25:0.001"}
  T13=${T13:-"k4-s100-lr1e-3:4:100:0.001 k8-s25-lr1e-3:8:25:0.001"}
  S13=${S13:-"k8-s25-lr1e-3:8:25:0.001"}
  VARIANTS=$P13 SEEDS="1000 1001" timeout "$JOB_SECONDS" bash experiments/agent_budget_probe.sh runs/gpu/probe13/val 6 > runs/gpu/logs/probe13-val.log 2>&1 &
  VARIANTS=$T13 SEEDS="0 1 2" timeout "$JOB_SECONDS" bash experiments/agent_budget_probe.sh runs/gpu/probe13/test 6 > runs/gpu/logs/probe13-test.log 2>&1 &
  VARIANTS=$S13 SEEDS="0 1 2" EXTRA="method.context_mode=shuffled" timeout "$JOB_SECONDS" bash experiments/agent_budget_probe.sh runs/gpu/probe13/shuffled 6 > runs/gpu/logs/probe13-shuffled.log 2>&1 &
fi
if has hypermask; then
  for seed in 0 1 2; do
    run "hypermask-split-given-s$seed" hypermask-split-fmnist seed=$seed
    run "hypermask-split-entropy-s$seed" hypermask-split-fmnist seed=$seed method.task_inference=entropy
    run "hnet-split-given-s$seed" hnet-split-fmnist seed=$seed
    run "hypermask-permuted-paper-s$seed" hypermask-permuted-paper seed=$seed trainer.iterations_per_task=$PERMUTED_ITERS
  done
fi
wait
echo "== done $(date +%T)"
[ -f "$OUT/cuda_tests.txt" ] && tail -3 "$OUT/cuda_tests.txt"
[ -f "$OUT/cost.txt" ] && cat "$OUT/cost.txt"
for d in runs/gpu/probe13/*/*/; do
  [ -d "$d" ] && echo "probe13 $d: $(ls "$d"/seed*/results.json 2>/dev/null | wc -l) of $(ls -d "$d"/seed*/ 2>/dev/null | wc -l) finished"
done
for d in runs/gpu/*/; do
  [ "$(basename "$d")" = probe13 ] && continue
  [ "$(basename "$d")" = logs ] && continue
  [ -f "$d/results.json" ] && echo "finished: $d" || echo "UNFINISHED: $d ($(tail -c 300 "runs/gpu/logs/$(basename "$d").log" | tr '\n' ' '))"
done
tar czf "$OUT/gpu_runs.tgz" --exclude=checkpoints runs/gpu
