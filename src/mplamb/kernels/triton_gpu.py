"""The Triton backend: the fused two-pass step on GPUs (kernels in :mod:`.triton_kernels`).

Per tensor, phase 1 (moments updated, per-block float64 partial sums of ``w**2`` and
``g**2``; directions never stored) and phase 2 (direction recomputed from the stored
moments).  No host synchronisation: scalars go to the device in one table per step,
partial sums are reduced on the device, step sizes are read by the kernels from device
memory.  float32 compute only: float64 tensors and half-precision moments are delegated to
the reference backend.  Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (tests).

Not yet measured on a GPU: one kernel launch per tensor and pass, so thousands of tiny
tensors pay launch overhead (a multi-tensor launch over a pointer table is the next step).
"""
from __future__ import annotations

import os
import sys
from typing import List

import torch

from . import reference
from ._staging import Staging
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

try:
    from . import triton_kernels as K

    AVAILABLE = True
except ImportError:  # triton is optional (extra "gpu")
    AVAILABLE = False

__all__ = ["AVAILABLE", "supports_device", "phase1_batch", "phase2_batch", "lamb_step", "grad_sum_of_squares"]

BLOCK = 1024
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports_device(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _arg(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # bf16 travels as bit patterns


def _delegate(batch: LambBatch) -> bool:
    return any(d == torch.float64 for d in batch.compute_dtypes()) or any(
        m.dtype != torch.float32 for m in batch.means)


def _scalars(batch: LambBatch, device: torch.device) -> torch.Tensor:
    rows = []
    for sc in batch.scalars:
        rows.append([sc.rescale, -1.0 if sc.clip is None else sc.clip, sc.beta1, sc.beta2, sc.one_minus_beta1,
                     sc.one_minus_beta2, sc.epsilon, sc.wd, 1.0 if sc.bias1 is None else sc.bias1,
                     1.0 if sc.bias2 is None else sc.bias2, 1.0 if sc.bias1 is None else 1.0 / sc.bias1,
                     1.0 if sc.bias2 is None else 1.0 / sc.bias2])
    return torch.tensor(rows, dtype=torch.float64).to(device, non_blocking=True)


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 launches (one per tensor) and the local squared norms, reduced on the device."""
    if _delegate(batch):
        p1 = reference.phase1_batch(batch, dry=dry)
        return Phase1Result(p1.sumsq, ("reference", p1), dry=dry)
    n = len(batch.weights)
    device = batch.weights[0].device
    stage = Staging()
    scal = _scalars(batch, device)
    rescale = batch.rescale.to(device=device, dtype=torch.float32) if batch.rescale is not None else scal
    sums: List[torch.Tensor] = []
    srcs = []
    for i in range(n):
        sc = batch.scalars[i]
        master = batch.masters[i]
        weight = batch.weights[i]
        # the decay source is written with a master, or when the output is the weight itself (in place)
        w = stage.write(master if master is not None else weight) if (
            master is not None or batch.outs[i] is weight) else stage.read(weight)
        g, m, v = stage.read(batch.grads[i]), stage.write(batch.means[i]), stage.write(batch.vars[i])
        numel = w.numel()
        blocks = max(1, -(-numel // BLOCK))
        partial = torch.zeros(blocks, 3, dtype=torch.float64, device=device)
        if numel:
            K.phase1_kernel[(blocks,)](
                _arg(w), _arg(g), m, v, scal[i], rescale, partial, numel,
                W_KIND=_KIND[w.dtype], G_KIND=_KIND[g.dtype], HAS_CLIP=sc.clip is not None,
                BIAS=sc.bias1 is not None, RESCALE_FROM_PTR=batch.rescale is not None, WRITE=not dry,
                BLOCK=BLOCK, **_no_fma())
        sums.append(partial.sum(0))
        srcs.append(w)
    rows = 3 if dry else 2
    sumsq = torch.stack(sums, dim=1)[:rows] if sums else torch.zeros(rows, 0, dtype=torch.float64, device=device)
    return Phase1Result(sumsq=sumsq, carry=(srcs, stage, scal, rescale), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    if isinstance(p1.carry, tuple) and p1.carry[0] == "reference":
        return reference.phase2_batch(batch, p1.carry[1], steps)
    srcs, stage, scal, rescale = p1.carry
    steps = steps.to(scal.device)
    for i, w in enumerate(srcs):
        master = batch.masters[i]
        out = batch.outs[i]
        out = w if (master is None and out is batch.weights[i]) else stage.write(out)
        numel = w.numel()
        if not numel:
            continue
        sc = batch.scalars[i]
        g = stage.read(batch.grads[i])
        K.phase2_kernel[(-(-numel // BLOCK),)](
            _arg(w), _arg(g), stage.write(batch.means[i]), stage.write(batch.vars[i]), _arg(out), scal[i], rescale,
            steps[i:i + 1], numel, W_KIND=_KIND[w.dtype], G_KIND=_KIND[g.dtype], O_KIND=_KIND[out.dtype],
            WRITE_W=master is not None, BIAS=sc.bias1 is not None, HAS_CLIP=sc.clip is not None,
            RESCALE_FROM_PTR=batch.rescale is not None, RECOMPUTE=p1.dry, BLOCK=BLOCK, **_no_fma())
    stage.finish()
    return None


def _no_fma() -> dict:
    # FMA contraction would change float32 results; the interpreter never fuses (and takes no such option)
    return {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One fused LAMB step over ``batch`` on the GPU."""
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


grad_sum_of_squares = reference.grad_sum_of_squares
