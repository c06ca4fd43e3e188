"""Test session set-up.

``TRITON_INTERPRET=1`` makes the Triton backend's kernels run on CPU tensors through
Triton's interpreter (it must be set before the kernels are defined), so the GPU
backend's correctness is tested on every machine; on a machine without triton the
backend is simply absent.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (golden_cases, spec_model, ...)
