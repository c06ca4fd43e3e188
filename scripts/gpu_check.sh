#!/usr/bin/env bash
# The GPU checks, run on a machine with a CUDA GPU (docs/gpu.md's figures come from here):
# the GPU tests (Triton backend against the reference, its lean step, capturable steps, CUDA-graph capture of
# a whole training step, torch.compile), whole-step timings (eager, host-synchronised, graph-replayed; full state
# and lean: 8-bit, 4-bit and bf16 moments) against fused AdamW and the copy roof, LAMB under FSDP2 CPU offload,
# and the main job on the GPU.
# Writes its logs and results to $OUT (default runs/gpu); each part has its own time limit.
#   bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  $PY -c "import numba; print('numba', numba.__version__)" 2>&1 | tail -1
  nproc; } 2>&1 | tee "$OUT/env.log"
timeout ${TEST_S:-300} $PY -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_cuda.py} 2>&1 | tail -40 \
  | tee "$OUT/tests.log"
# the lean step's kernels (8-/4-bit codes, Kahan weights, capturable) compiled for the GPU, against the CPU reference
timeout ${LEAN_TEST_S:-300} $PY -m pytest -q -p no:cacheprovider ${LEAN_TESTS:-tests/test_lean_triton.py} 2>&1 \
  | tail -40 | tee "$OUT/lean_tests.log"
timeout ${STEP_S:-240} $PY benchmarks/gpu_step.py --out "$OUT" 2>&1 | tail -30 | tee "$OUT/gpu_step.log"
timeout ${OFFLOAD_S:-150} $PY benchmarks/cpu_offload.py --out "$OUT/cpu_offload.json" 2>&1 | tail -12 \
  | tee "$OUT/cpu_offload.log"
timeout ${TRAIN_S:-120} $PY -m mplamb train --device cuda --steps ${TRAIN_STEPS:-200} --no-progress \
  --out /tmp/mplamb-train-cuda 2>&1 | tail -15 | tee "$OUT/train.log"
