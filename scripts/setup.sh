#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU torch and mplamb (editable, with its test extra).
# Pinning torch==2.13.0 keeps pip from resolving a multi-gigabyte CUDA build.  triton (extra "gpu") is installed
# so that the GPU kernels are tested on CPU through Triton's interpreter; the benchmark peers are installed
# with --no-deps (timm would otherwise pull a torchvision that cannot load with this torch); transformers and
# lightning for the framework tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test]" "triton==3.9.0"
# the training frameworks driven by tests/test_integrations.py (pinned torch on the same line: pip keeps it)
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 transformers==5.25.0 \
    accelerate==1.16.0 lightning==2.6.6 torchmetrics==1.9.0 lightning-utilities==0.15.3
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps pytorch_optimizer==4.1.0 torch-optimizer==0.3.0 \
    pytorch-ranger==0.1.1 timm==1.0.31
