"""LAMB kernels: the math, behind one contract (:mod:`.contract`), once per backend.

A backend is a module with

* ``phase1_batch(batch, dry=False) -> Phase1Result`` and ``phase2_batch(batch, p1, steps)``:
  the two halves of a step (see :mod:`.contract`; a *dry* phase 1 writes nothing and phase 2
  then writes the moments too); ``lamb_step(batch, reducer, dry=False)`` runs both with the
  norms reduced in between;
* ``grad_sum_of_squares(grads, memo=None) -> Tensor``: per-tensor float64 sums of squares of the
  raw gradients (the global-norm clipping and non-finite check read them; ``memo``: the batch
  memo, where a backend may leave what phase 1 of the same step can reuse);
* optionally ``plan_phase1(batch, dry=False)``: phase 1's host preparation now, its launch when
  the returned callable runs (the Triton backend; see :func:`.contract.plan_phase1`);
* optionally ``CAPTURABLE = True``: it steps capturable batches (``batch.on_device``: step counts,
  lr and the skip flag in device tensors) without any host synchronisation (reference, triton);
* optionally ``LEAN = True``: it steps lean batches (``batch.lean``: moments in a :mod:`.codec`
  format, Kahan-compensated weights) bit-identically to the reference (reference, fused_cpu, triton);
  the optimizer gives lean groups to no other backend;
* optionally ``supports_device(device) -> bool`` and ``AVAILABLE`` (False when an optional
  dependency such as numba or Triton is missing).

``reference`` is plain per-tensor PyTorch and the source of truth; every other backend
is tested against it.  :func:`get_backend` resolves a name (or ``"auto"``) for a device.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict, List, Tuple

import torch

from .contract import DeviceScalars, LambBatch, NormReducer, Phase1Result, StepResult, finish_norms, local_reducer, plan_phase1

__all__ = ["DeviceScalars", "LambBatch", "NormReducer", "Phase1Result", "StepResult", "finish_norms", "local_reducer", "plan_phase1",
           "get_backend", "choose_backend", "FUSED", "FOREACH", "available_backends", "BACKENDS", "resolve_backend_name"]

# public name -> module of this package
BACKENDS: Dict[str, str] = {
    "reference": "reference",
    "foreach": "foreach",
    "fused_cpu": "fused_cpu",
    "triton": "triton_gpu",
}

# Preference order of "auto" per device type (first available wins).
_AUTO_ORDER = {"cpu": ["fused_cpu", "reference"], "cuda": ["triton", "foreach", "reference"]}


def _module(name: str) -> ModuleType | None:
    try:
        mod = importlib.import_module(f"{__name__}.{BACKENDS[name]}")
    except ImportError:
        return None
    return mod if getattr(mod, "AVAILABLE", True) else None


def _runs_on(name: str, dev: torch.device) -> bool:
    mod = _module(name)
    if mod is None:
        return False
    supports = getattr(mod, "supports_device", None)
    return supports is None or supports(dev)


# what the fastest backend of a device needs, named in the warning when "auto" cannot use it
_NEEDS = {"fused_cpu": "numba (pip install numba)", "triton": "triton (pip install triton)"}
_warned: set = set()


def _warn_if_slow(dev: torch.device, chosen: str) -> None:
    """Warn once per device type when ``auto`` could not take the device's fastest backend."""
    best = _AUTO_ORDER.get(dev.type, ["reference"])[0]
    if chosen == best or (dev.type, best) in _warned:
        return
    _warned.add((dev.type, best))
    warnings.warn(f"mplamb: backend='auto' on {dev.type} uses {chosen!r}, many times slower than {best!r}, which "
                  f"needs {_NEEDS.get(best, best)} and is not available here", RuntimeWarning, stacklevel=4)


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Backend names that can run on ``device`` in this environment."""
    dev = torch.device(device)
    return [name for name in BACKENDS if _runs_on(name, dev)]


def resolve_backend_name(name: str = "auto", device: torch.device | str = "cpu") -> str:
    """The concrete backend name for ``name`` on ``device`` (``"auto"``: the fastest available).

    Only the candidates looked at are imported (``"auto"`` on CPU never imports triton)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    dev = torch.device(device)
    if name == "auto":
        chosen = next((c for c in _AUTO_ORDER.get(dev.type, ["reference"]) if _runs_on(c, dev)), "reference")
        _warn_if_slow(dev, chosen)
        return chosen
    if not _runs_on(name, dev):
        raise ValueError(f"backend: {name!r} is not available for device {dev} in this environment "
                         f"(available: {available_backends(dev)})")
    return name


FUSED = ("fused_cpu", "triton")  # what torch's ``fused=True`` asks for
FOREACH = ("foreach",)  # what torch's ``foreach=True`` asks for


def choose_backend(name: str = "auto", device: torch.device | str = "cpu", *, fused: bool | None = None,
                   foreach: bool | None = None, capturable: bool | None = False) -> Tuple[str, bool]:
    """The backend an optimizer steps with, and whether the step is capturable.

    ``name`` other than ``"auto"`` is taken as it is.  For ``"auto"``, the device's order of
    :func:`resolve_backend_name`, narrowed by torch's keywords: ``fused=True`` keeps only fused
    backends, ``foreach=True`` only ``foreach``, ``False`` drops that kind.  ``capturable``: ``True``
    needs a backend with ``CAPTURABLE`` (raises ``ValueError`` without one), ``None`` takes one where
    there is one, ``False`` never.
    """
    dev = torch.device(device)
    if name != "auto":
        order = [resolve_backend_name(name, dev)]
    else:
        order = _AUTO_ORDER.get(dev.type, ["reference"]) + ["reference"]
        if fused:
            order = [c for c in order if c in FUSED]
        elif foreach:
            order = list(FOREACH)
        order = [c for c in order if not (fused is False and c in FUSED) and not (foreach is False and c in FOREACH)]
        order = [c for c in dict.fromkeys(order) if _runs_on(c, dev)]
        if order and fused is None and foreach is None:
            _warn_if_slow(dev, order[0])
        if not order:
            flag = "fused" if fused else "foreach"
            raise ValueError(f"{flag}=True: no such backend for device {dev} in this environment "
                             f"(available: {available_backends(dev)}; fused kernels need numba on the CPU, "
                             "triton on CUDA)")
    if capturable is not False:
        for cand in order:
            if getattr(_module(cand), "CAPTURABLE", False):
                return cand, True
        if capturable:
            raise ValueError(f"capturable=True: backend {name!r} on {dev} reads its step counts on the host; "
                             "use backend='triton' or 'reference', or capturable=False")
    return order[0], False


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> ModuleType:
    """The backend module of ``name`` for ``device`` (see the module docstring for its contract)."""
    return importlib.import_module(f"{__name__}.{BACKENDS[resolve_backend_name(name, device)]}")
