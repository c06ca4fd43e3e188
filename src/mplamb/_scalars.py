"""Scalar rules shared by every backend: one place, never re-typed per backend.

MXNet parses every hyper-parameter as a float32 and evaluates a few scalar
expressions in a precise mix of float32 and float64.  This module turns the
Python-level hyper-parameters into the exact scalar values each elementwise
kernel consumes (:class:`Phase1Scalars`), and implements the per-tensor
trust-ratio rule of phase 2 (:func:`step_sizes`) on device tensors, vectorised
over all tensors of a step, so that no backend needs a host synchronisation.

Phase-1 scalars for a compute dtype ``c`` (float32, or float64 for float64 tensors)::

    beta1, beta2, eps, wd, rescale, clip   = float32(x)            (then widened to c)
    one_minus_beta1                        = c(1) - c(beta1)
    b1t = c(pow(float64(beta1), t));         bias1 = float64(1) - float64(b1t)
    b2t = c(pow(float64(beta2), t));         bias2 = c(1) - b2t

``mean_hat = c(float64(mean) / bias1)`` (MXNet divides by a double) while
``var_hat = var / bias2`` is a plain ``c`` division.  float32 values are held in
Python floats; every float32 operation above is an IEEE operation on float32
operands, which a float64 evaluation followed by one rounding reproduces exactly.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "f32",
    "compute_dtype",
    "Phase1Scalars",
    "phase1_scalars",
    "active_bound",
    "step_sizes",
    "bias_corrections",
    "bias_table",
    "BIAS_TABLE_MAX_ROWS",
]

_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 value (round-half-even), as a Python float."""
    x = float(x)
    if not math.isfinite(x):
        return x
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # beyond float32's range: rounds to +-inf
        return math.copysign(math.inf, x)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for tensors of ``dtype``: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_to(x: float, dtype: torch.dtype) -> float:
    return x if dtype == torch.float64 else f32(x)


@dataclass(frozen=True)
class Phase1Scalars:
    """Exact scalar operands of phase 1 for one tensor (see the module docstring).

    ``clip`` is ``None`` when clipping is off; ``bias1``/``bias2`` are ``None``
    without bias correction.  ``bias1`` is a float64 value, all others are values of
    the compute dtype.
    """

    rescale: float
    clip: Optional[float]
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    epsilon: float
    wd: float
    bias1: Optional[float]
    bias2: Optional[float]


def phase1_scalars(
    *,
    t: int,
    wd: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction: bool,
    rescale_grad: float,
    clip_gradient: float,
    dtype: torch.dtype = torch.float32,
    grad_averaging: bool = True,
) -> Phase1Scalars:
    """Scalars of phase 1 for step ``t`` in compute dtype ``dtype`` (validated inputs).

    ``grad_averaging=False`` (Apex's option) accumulates ``mean = beta1*mean + s``:
    the factor ``1 - beta1`` becomes 1.
    """
    b1, b2 = f32(beta1), f32(beta2)
    clip = f32(clip_gradient)
    bias1 = bias2 = None
    if bias_correction:
        bias1, bias2 = bias_corrections(b1, b2, t, dtype)
    return Phase1Scalars(
        rescale=f32(rescale_grad),
        clip=clip if clip > 0 else None,
        beta1=b1,
        beta2=b2,
        one_minus_beta1=_round_to(1.0 - b1, dtype) if grad_averaging else 1.0,
        one_minus_beta2=_round_to(1.0 - b2, dtype),
        epsilon=f32(epsilon),
        wd=f32(wd),
        bias1=bias1,
        bias2=bias2,
    )


def bias_corrections(b1: float, b2: float, t: int, dtype: torch.dtype) -> Tuple[float, float]:
    """``(bias1, bias2)`` of step ``t`` for float32-rounded betas ``b1``, ``b2`` (module docstring)."""
    b1t = _round_to(math.pow(b1, t), dtype)
    b2t = _round_to(math.pow(b2, t), dtype)
    return 1.0 - b1t, _round_to(1.0 - b2t, dtype)


BIAS_TABLE_MAX_ROWS = 1 << 20


@functools.lru_cache(maxsize=32)
def bias_table(beta1: float, beta2: float, bias_correction: bool, dtype: torch.dtype) -> torch.Tensor:
    """The bias corrections of every step, for steps whose count lives on the device (capturable steps).

    A ``(T + 1, 4)`` float64 CPU tensor whose row ``t`` holds ``(bias1, bias2, 1/bias1, 1/bias2)`` of
    step ``t`` (:func:`phase1_scalars`; row 0 is unused), where ``T`` is the first step from which
    the row no longer changes (``beta**t`` has vanished in the compute dtype: ``T = 356`` for
    ``beta1 = 0.9``, about 17,320 for ``beta2 = 0.999`` in float32), so step ``t`` reads row
    ``min(t, T)`` exactly.  Without bias correction the table is one row of zeros (``bias1 = 0``:
    no correction).  Raises ``ValueError`` when betas this close to 1 would need more than
    :data:`BIAS_TABLE_MAX_ROWS` rows.
    """
    if not bias_correction:
        return torch.zeros(1, 4, dtype=torch.float64)
    b1, b2 = f32(beta1), f32(beta2)
    rows = [(0.0, 0.0, 0.0, 0.0)]
    t = 1
    while True:
        bias1, bias2 = bias_corrections(b1, b2, t, dtype)
        rows.append((bias1, bias2, 1.0 / bias1, 1.0 / bias2))
        if bias1 == 1.0 and bias2 == 1.0:
            return torch.tensor(rows, dtype=torch.float64)
        t += 1
        if t >= BIAS_TABLE_MAX_ROWS:
            raise ValueError(f"betas: ({beta1}, {beta2}) keep changing the bias corrections beyond step "
                             f"{BIAS_TABLE_MAX_ROWS}, the longest table a capturable step keeps on the device; "
                             "use capturable=False")


def active_bound(bound: Optional[float]) -> Optional[float]:
    """A trust-ratio bound as used: ``None`` (off) unless it is a number ``> 0`` (mplamb D2)."""
    if bound is None:
        return None
    b = f32(bound)
    return b if b > 0 else None


TensorOrFloat = Union[torch.Tensor, float]


def step_sizes(
    lr: TensorOrFloat,
    r1: torch.Tensor,
    r2: torch.Tensor,
    *,
    lower_bound: Optional[float] = None,
    upper_bound: Optional[float] = None,
    max_trust_ratio: Optional[float] = None,
    adapt: Union[bool, torch.Tensor] = True,
) -> torch.Tensor:
    """Per-tensor step size of phase 2, elementwise over tensors of norms.

    With ``r1' = min(max(r1, lower_bound), upper_bound)`` (each bound only when
    active, lower first, NaN preserved)::

        step = lr                         if r1' == 0 or r2 == 0
             = (lr * r1') / r2            otherwise (MXNet: product first)
             = lr * min(r1' / r2, cap)    with ``max_trust_ratio=cap``
             = lr                         where ``adapt`` is False (no layer adaptation)

    ``r1``/``r2`` are norms in the compute dtype; ``lr`` a float32 value or a tensor
    of per-tensor learning rates.  The result has ``r1``'s dtype and shape.
    """
    lo, hi = active_bound(lower_bound), active_bound(upper_bound)
    r1b = r1
    if lo is not None:
        r1b = torch.clamp(r1b, min=lo)
    if hi is not None:
        r1b = torch.clamp(r1b, max=hi)
    if not isinstance(lr, torch.Tensor):
        lr = torch.full_like(r1, lr)
    else:
        lr = lr.to(r1.dtype)
    if max_trust_ratio is None:
        adapted = (lr * r1b) / r2
    else:
        adapted = lr * torch.clamp(r1b / r2, max=f32(max_trust_ratio))
    plain = (r1b == 0) | (r2 == 0)
    if isinstance(adapt, torch.Tensor):
        plain = plain | ~adapt
    elif not adapt:
        return lr.clone()
    return torch.where(plain, lr, adapted)
