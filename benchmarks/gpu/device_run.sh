#!/usr/bin/env bash
# The GPU benchmark as one command on a GPU host (the device tool's machine): the host's
# facts, then run_gpu.py on the packed bundle (cost-model calibration first, then the models).
# Everything it measures goes to $OUT (default benchmarks/results/gpu_run/).
#
#   .venv/bin/python benchmarks/gpu/prepare.py --python 3.12 --calibration \
#       --out benchmarks/gpu/bundle --pack benchmarks/gpu/bundle.tar.gz      # here, ~8 min
#   bash benchmarks/gpu/device_run.sh                                         # there
set -u -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}  # git-ignored
BUNDLE=${BUNDLE:-benchmarks/gpu/bundle.tar.gz}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -V
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, \
'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/host.txt"
"$PY" benchmarks/gpu/run_gpu.py --bundle "$BUNDLE" --out "$OUT/gpu.jsonl" \
  --calibration-out "$OUT/gpu_calibration_timings.jsonl" "$@" 2>&1 | tee "$OUT/run_gpu.log"
