"""The foreach backend: the reference's math as ``torch._foreach_*`` multi-tensor operations.

Every stage is one multi-tensor call over all tensors of a (device, compute dtype) group,
in the reference's order of operations (so float32 results match it; square roots go
through :func:`~._ieee.ieee_sqrt` on CPU, where ``torch.sqrt`` is not correctly rounded).
Useful on GPUs, where a foreach call is a few fused launches; on CPU it allocates
full-size temporaries per stage and is no faster than the reference (``python -m mplamb bench``).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch

from ._ieee import ieee_sqrt
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

__all__ = ["phase1_batch", "phase2_batch", "lamb_step", "grad_sum_of_squares"]


def _groups(batch: LambBatch) -> Dict[tuple, List[int]]:
    groups: Dict[tuple, List[int]] = {}
    for i, c in enumerate(batch.compute_dtypes()):
        groups.setdefault((batch.weights[i].device, c), []).append(i)
    return groups


def _sqrt(xs: List[torch.Tensor]) -> List[torch.Tensor]:
    if xs and xs[0].device.type == "cpu":
        return [ieee_sqrt(x) for x in xs]
    return list(torch._foreach_sqrt(xs))


def _sumsq(xs: List[torch.Tensor]) -> torch.Tensor:
    if not xs:
        return torch.zeros(0, dtype=torch.float64)
    x64 = [x.to(torch.float64) for x in xs]
    return torch.stack([t.sum() for t in torch._foreach_mul(x64, x64)])


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 and local squared norms; with ``dry`` the new moments are kept for phase 2."""
    n = len(batch.weights)
    device = batch.weights[0].device if n else torch.device("cpu")
    sumsq = torch.empty(3 if dry else 2, n, dtype=torch.float64, device=device)
    directions: List[torch.Tensor] = [None] * n  # type: ignore[list-item]
    pending = []
    for (_, c), idx in _groups(batch).items():
        scs = [batch.scalars[i] for i in idx]
        w = [batch.decay_source(i).to(c) for i in idx]
        grads = [batch.grads[i].to(c) for i in idx]
        s = (torch._foreach_mul(grads, [sc.rescale for sc in scs]) if batch.rescale is None
             else torch._foreach_mul(grads, batch.rescale.to(device=grads[0].device)))
        clip = scs[0].clip
        if clip is not None:  # one clip value per batch (it is a group option)
            s = torch._foreach_clamp_max(torch._foreach_clamp_min(s, -clip), clip)
        m = torch._foreach_add(torch._foreach_mul([batch.means[i].to(c) for i in idx], [sc.beta1 for sc in scs]),
                               torch._foreach_mul(s, [sc.one_minus_beta1 for sc in scs]))
        v = torch._foreach_add(torch._foreach_mul([batch.vars[i].to(c) for i in idx], [sc.beta2 for sc in scs]),
                               torch._foreach_mul(torch._foreach_mul(s, [sc.one_minus_beta2 for sc in scs]), s))
        if dry:
            pending.append((idx, m, v))
            sumsq[2, idx] = _sumsq([batch.grads[i] for i in idx]).to(device)
        else:
            torch._foreach_copy_([batch.means[i] for i in idx], m)
            torch._foreach_copy_([batch.vars[i] for i in idx], v)
        if scs[0].bias1 is not None:
            m = [t.to(c) for t in torch._foreach_div([t.to(torch.float64) for t in m], [sc.bias1 for sc in scs])]
            v = torch._foreach_div(v, [sc.bias2 for sc in scs])
        g = torch._foreach_add(torch._foreach_div(m, torch._foreach_add(_sqrt(list(v)), [sc.epsilon for sc in scs])),
                               torch._foreach_mul(w, [sc.wd for sc in scs]))
        sumsq[0, idx] = _sumsq(w).to(device)
        sumsq[1, idx] = _sumsq(list(g)).to(device)
        for i, gi in zip(idx, g):
            directions[i] = gi
    return Phase1Result(sumsq=sumsq, carry=(directions, pending), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    directions, pending = p1.carry
    for idx, m, v in pending:
        torch._foreach_copy_([batch.means[i] for i in idx], m)
        torch._foreach_copy_([batch.vars[i] for i in idx], v)
    for (_, c), idx in _groups(batch).items():
        g = [directions[i] for i in idx]
        w = [batch.decay_source(i).to(c) for i in idx]
        new = torch._foreach_sub(w, torch._foreach_mul(g, list(steps[idx].to(c).unbind())))
        masters = [batch.masters[i] for i in idx if batch.masters[i] is not None]
        if masters:
            torch._foreach_copy_(masters, [t for i, t in zip(idx, new) if batch.masters[i] is not None])
        torch._foreach_copy_([batch.outs[i] for i in idx], new)


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One LAMB step over ``batch`` with multi-tensor operations."""
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], memo: Optional[dict] = None) -> torch.Tensor:
    """Per-tensor ``sum(grad**2)`` in float64, shape ``(n,)`` (``memo``: unused)."""
    return _sumsq(list(grads))
