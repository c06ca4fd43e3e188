#!/usr/bin/env bash
# The GPU checks, run on a machine with a CUDA GPU (the README's GPU figures come from here):
# the Triton backend's tests compiled for the GPU, kernel timings against a device-to-device
# copy (CONFIGS: BLOCKxWARPS list to sweep, default the shipped 1024x4), and the side-by-side step
# benchmark.  Writes its logs and results to $OUT (default runs/gpu).
#   bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/kernels.log"
timeout 240 $PY -m pytest -q -p no:cacheprovider --maxfail=5 tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 150 $PY benchmarks/gpu_kernels.py --configs "${CONFIGS:-1024x4}" --out "$OUT/gpu_kernels.json" 2>&1 | tee -a "$OUT/kernels.log"
timeout 240 $PY -m mplamb bench --device cuda --workloads bert-large --repeats 20 --out "$OUT/bench" 2>&1 \
  | tail -30 | tee "$OUT/bench.log"
timeout 120 $PY -m mplamb bench --device cuda --workloads 10k-small --backends triton,foreach --no-peers --repeats 7 \
  --out "$OUT/bench_small" 2>&1 | tail -12 | tee -a "$OUT/bench.log"
rm -f "$OUT/bench_small/bench.png" "$OUT/bench_small/bench.json"
