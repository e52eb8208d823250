#!/usr/bin/env bash
# Create .venv and install metagate with its test tools. Idempotent: a second call is quick.
#
# Torch: on a machine without an NVIDIA GPU a CPU build is installed (no multi-GB CUDA download):
# first a CPU wheel that pip can already see locally (find-links), else PyTorch's CPU index.
# On a machine with a GPU the ordinary CUDA build from PyPI is installed.
# Set METAGATE_TORCH=skip to keep whatever torch the venv already has.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${METAGATE_VENV:-.venv}
TORCH_RANGE=${METAGATE_TORCH_RANGE:-"torch>=2.2,<3"}
CPU_INDEX=${METAGATE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

have_torch() { "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; }
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ "${METAGATE_TORCH:-}" != "skip" ] && ! have_torch; then
  if have_gpu; then
    echo "[setup] NVIDIA GPU found: installing a CUDA build of torch"
    pip install -q "$TORCH_RANGE"
  elif pip install -q --no-index --no-deps "$TORCH_RANGE" 2>/dev/null; then
    echo "[setup] no GPU: installed a local CPU build of torch"
  else
    echo "[setup] no GPU: installing a CPU build of torch from $CPU_INDEX"
    pip install -q --index-url "$CPU_INDEX" "$TORCH_RANGE"
  fi
fi

# The package, its dependencies (torch's own ones included) and the test tools.
pip install -q -e ".[dev]"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
