"""The reference backend: plain per-tensor PyTorch, readable, the source of truth.

Every other backend is tested against this module.  Each function performs one
named stage of LAMB with MXNet's exact order of operations (see ``_scalars`` for
the scalar values and ``tests/golden/NOTES.md`` for the specification)::

    phase 1   s    = clip(c(grad) * rescale)                      c = compute dtype
              mean = beta1*mean + (1-beta1)*s
              var  = beta2*var  + ((1-beta2)*s)*s
              g    = mean_hat / (sqrt(var_hat) + eps) + wd * w     (Adam direction + decay)
    norms     r1 = ||w||,  r2 = ||g||                               (sums of squares in float64)
    phase 2   w    = w - step * g,  step from ``_scalars.step_sizes`` (trust ratio * lr)

Every arithmetic operation is a separate tensor operation, so nothing is fused
into a multiply-add and float32 results are bit-for-bit MXNet's.

A capturable batch (``batch.on_device``) takes its bias corrections from the device row of
each tensor's step count (the same values ``_scalars`` gives the host), its lr from a device
tensor, and writes every result through ``where(skip, old, new)``: a skipped step leaves every
tensor bitwise as it was, without the host ever reading the flag.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple, Union

import torch

from .._scalars import Phase1Scalars, compute_dtype
from ._ieee import ieee_sqrt
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

CAPTURABLE = True  # steps batches with device scalars (batch.on_device) without a host synchronisation

__all__ = ["CAPTURABLE", "moments", "direction", "phase1", "phase2", "phase1_batch", "phase2_batch", "sum_of_squares",
           "grad_sum_of_squares", "lamb_step"]

Scale = Union[float, torch.Tensor]


def moments(
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sc: Phase1Scalars,
    c: torch.dtype,
    rescale: Optional[Scale] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The new ``(mean, var)`` in the compute dtype ``c``; nothing is written."""
    s = grad.to(c) * (sc.rescale if rescale is None else rescale)
    if sc.clip is not None:
        s = torch.clamp(s, -sc.clip, sc.clip)
    m = mean.to(c) * sc.beta1 + s * sc.one_minus_beta1
    v = var.to(c) * sc.beta2 + (s * sc.one_minus_beta2) * s
    return m, v


def direction(m: torch.Tensor, v: torch.Tensor, w: torch.Tensor, sc: Phase1Scalars,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g = mean_hat / (sqrt(var_hat) + eps) + wd * w`` from the new moments (compute dtype).

    ``bias``: this step's ``(bias1, bias2, ...)`` float64 row on the device (capturable steps),
    used instead of ``sc.bias1``/``sc.bias2`` (which then only say whether to correct at all)."""
    c = m.dtype
    if sc.bias1 is not None:
        bias1, bias2 = (sc.bias1, sc.bias2) if bias is None else (bias[0], bias[1].to(c))
        m = (m.to(torch.float64) / bias1).to(c)
        v = v / bias2
    return m / (ieee_sqrt(v) + sc.epsilon) + w.to(c) * sc.wd


def phase1(
    w: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sc: Phase1Scalars,
    rescale: Optional[Scale] = None,
) -> torch.Tensor:
    """Phase 1 in place on ``mean``/``var``; returns ``g`` in the compute dtype of ``w``.

    ``w`` is the weight the decay applies to (the fp32 master in mixed precision).
    ``rescale`` overrides ``sc.rescale`` (a 0-d tensor: a loss-scale or clip factor
    that lives on the device).
    """
    m, v = moments(grad, mean, var, sc, compute_dtype(w.dtype), rescale)
    mean.copy_(m)
    var.copy_(v)
    return direction(m, v, w, sc)


def phase2(
    w: torch.Tensor,
    g: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor,
    master: Optional[torch.Tensor] = None,
) -> None:
    """``new = w - step * g`` in ``g``'s dtype; written to ``master`` (if given) and ``out``.

    ``w`` is the master when there is one.  ``step`` is a 0-d tensor of ``g``'s dtype.
    ``out`` may be ``w`` itself (in-place update).
    """
    new = w.to(g.dtype) - step * g
    if master is not None:
        master.copy_(new)
    out.copy_(new)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2)`` accumulated in float64 (0-d tensor)."""
    x = x.to(torch.float64)
    return torch.sum(x * x)


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 for every tensor of ``batch`` and the local squared norms (carry: the directions,
    and with ``dry`` the new moments, written only in phase 2)."""
    n = len(batch.weights)
    device = batch.weights[0].device if n else torch.device("cpu")
    directions, pending = [], []
    sumsq = torch.empty(3 if dry else 2, n, dtype=torch.float64, device=device)
    dev = batch.on_device
    rows = dev.bias_rows() if dev is not None else None
    for i in range(n):
        w = batch.decay_source(i)
        if dry or dev is not None:  # moments written in phase 2 (a capturable step: written unless skipped)
            m, v = moments(batch.grads[i], batch.means[i], batch.vars[i], batch.scalars[i],
                           compute_dtype(w.dtype), batch.rescale)
            g = direction(m, v, w, batch.scalars[i], None if rows is None else rows[i])
            pending.append((m, v))
            if dry:
                sumsq[2, i] = sum_of_squares(batch.grads[i])
        else:
            g = phase1(w, batch.grads[i], batch.means[i], batch.vars[i], batch.scalars[i], batch.rescale)
        directions.append(g)
        sumsq[0, i] = sum_of_squares(w)
        sumsq[1, i] = sum_of_squares(g)
    return Phase1Result(sumsq=sumsq, carry=(directions, pending), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 for every tensor of ``batch`` with per-tensor step sizes ``steps`` (after a dry
    phase 1, the moments it computed are written first)."""
    directions, pending = p1.carry
    dev = batch.on_device
    if dev is not None:
        _phase2_unless_skipped(batch, directions, pending, steps, dev.skip)
        dev.advance()
        return
    for i, (m, v) in enumerate(pending):
        batch.means[i].copy_(m)
        batch.vars[i].copy_(v)
    for i, g in enumerate(directions):
        phase2(batch.decay_source(i), g, steps[i].to(g.dtype), batch.outs[i], batch.masters[i])


def _phase2_unless_skipped(batch: LambBatch, directions: list, pending: list, steps: torch.Tensor,
                           skip: torch.Tensor) -> None:
    """Phase 2 of a capturable batch: every write is ``where(skip, old, new)``."""
    def put(dst: torch.Tensor, new: torch.Tensor) -> None:
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))

    for i, ((m, v), g) in enumerate(zip(pending, directions)):
        put(batch.means[i], m)
        put(batch.vars[i], v)
        w = batch.decay_source(i)
        new = w.to(g.dtype) - steps[i].to(g.dtype) * g
        if batch.masters[i] is not None:
            put(batch.masters[i], new)
        put(batch.outs[i], new)


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One fused LAMB step over ``batch`` (see :class:`~mplamb.kernels.contract.LambBatch`).

    Phase 1 for every tensor, then all squared norms reduced by ``reducer`` at once,
    then phase 2 for every tensor.
    """
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], memo: Optional[dict] = None) -> torch.Tensor:
    """Per-tensor ``sum(grad**2)`` in float64, shape ``(n,)``, on the grads' device (``memo``: unused)."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([sum_of_squares(g) for g in grads])
