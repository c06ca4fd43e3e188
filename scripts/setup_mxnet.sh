#!/usr/bin/env bash
# An interpreter with Apache MXNet 1.9.1 for the benchmark's MXNet peer (.venv-mxnet, beside .venv).
# MXNet 1.9 needs numpy < 1.24; it gets a virtual environment of its own and runs in a process of
# its own (python -m mplamb bench finds .venv-mxnet/bin/python, or pass --mxnet-python).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-mxnet
.venv-mxnet/bin/pip install -q mxnet==1.9.1 numpy==1.23.5 requests graphviz==0.8.4
.venv-mxnet/bin/python -c "import mxnet; print('MXNet', mxnet.__version__, 'in .venv-mxnet')"
