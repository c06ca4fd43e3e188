"""LAMB kernels: the math, behind one contract (:mod:`.contract`), once per backend.

``reference`` is plain per-tensor PyTorch and the source of truth; every other
backend is tested against it.  :func:`get_backend` resolves a name (or ``"auto"``)
to a step function for a device.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List

import torch

from .contract import LambBatch, NormReducer, StepResult, local_reducer

__all__ = ["LambBatch", "NormReducer", "StepResult", "local_reducer", "get_backend", "available_backends", "BACKENDS"]

StepFn = Callable[[LambBatch, NormReducer], StepResult]

# name -> (module, function, predicate(device) telling whether it can run there)
BACKENDS: Dict[str, tuple] = {
    "reference": ("reference", "lamb_step"),
}

# Preference order of "auto" per device type (first available wins).
_AUTO_ORDER = {"cpu": ["reference"], "cuda": ["reference"]}


def _module_available(name: str) -> bool:
    module = BACKENDS[name][0]
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError:
        return False
    return getattr(mod, "AVAILABLE", True)


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Backend names that can run on ``device`` in this environment."""
    dev = torch.device(device)
    out = []
    for name in BACKENDS:
        if not _module_available(name):
            continue
        mod = importlib.import_module(f"{__name__}.{BACKENDS[name][0]}")
        supports = getattr(mod, "supports_device", None)
        if supports is None or supports(dev):
            out.append(name)
    return out


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> StepFn:
    """The step function of backend ``name`` (``"auto"``: the fastest available for ``device``)."""
    dev = torch.device(device)
    if name == "auto":
        avail = set(available_backends(dev))
        for cand in _AUTO_ORDER.get(dev.type, ["reference"]):
            if cand in avail:
                name = cand
                break
        else:
            name = "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    if name not in available_backends(dev):
        raise ValueError(f"backend: {name!r} is not available for device {dev} in this environment")
    module, fn = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)
