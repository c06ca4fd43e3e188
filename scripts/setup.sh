#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU torch and mplamb (editable) plus its extras.
# Pinning torch==2.13.0 keeps pip from resolving a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,fast,plot]"
