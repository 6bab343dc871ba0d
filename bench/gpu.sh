#!/usr/bin/env bash
# convtune on a GPU machine, in one run of at most 8 minutes, no network needed (bench/gpu_bench.py):
#   matmul peaks (fp32, TF32, bf16); training samples/s of the 32x32 `shapes` set at several batch sizes
#   in fp32, TF32, bf16 autocast, channels_last and torch.compile, with the achieved TFLOP/s against the
#   bf16 peak; trials/min of one-epoch digits trials with 1, 2, 4 and 8 processes sharing the GPU.
# Prints tables, then one JSON line (the last line). From the repository root:
#   bash bench/gpu.sh            # on a machine with a CUDA GPU
#   bash bench/gpu.sh --cpu      # tiny sizes on the CPU: checks the script here
# Python: $PYTHON, else .venv/bin/python, else python3 (needs torch, numpy, pydantic, scikit-learn).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! $PY -c "import torch, numpy, pydantic, sklearn" 2>/dev/null; then
    echo "gpu.sh: $PY lacks torch, numpy, pydantic or scikit-learn (pip install -e '.[worker]')" >&2
    exit 2
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >&2 || true

export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/convtune-inductor}
# 470 s of wall at most: the script itself stops starting measurements at --budget-s.
exec timeout --signal=TERM 470 "$PY" bench/gpu_bench.py ${GPU_BENCH_BUDGET_S:+--budget-s "$GPU_BENCH_BUDGET_S"} "$@"
