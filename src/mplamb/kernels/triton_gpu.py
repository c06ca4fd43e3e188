"""The Triton backend: the fused two-pass step on GPUs (kernels in :mod:`.triton_kernels`).

Multi-tensor launches: per partition of tensors sharing dtypes (:func:`._plan.partition`),
phase 1 is one kernel over every block of every tensor (moments updated, per-block float64
partial sums of ``w**2`` and ``g**2``; directions never stored) plus one per-tensor reduction
kernel; phase 2 is one kernel (direction recomputed from the stored moments).  The gradient
pass (:func:`grad_sum_of_squares`) is likewise one kernel plus one reduction.

Per step the host builds one small table (addresses and hyper-parameter rows of every
tensor) and uploads it from pinned memory when its content changed since the last step of the
same tensors (:class:`_Resident`); the block table is cached per set of tensor sizes.  A
capturable batch (``batch.on_device``) reads its step counts, bias corrections, lr and skip flag
from device memory, so its table does not change from step to step and a CUDA graph can
capture the step.  No host synchronisation: partial sums are reduced on the device and step sizes are
read by the kernels from device memory.  float32 compute only: partitions of float64 tensors and of
half-precision moments are delegated to the reference backend.  Runs on CUDA; on CPU only
under ``TRITON_INTERPRET=1`` (the tests).

Lean batches (``batch.lean``: moments in a :mod:`.codec` format, Kahan-compensated weights) are
stepped by :mod:`.triton_lean` (kernels in :mod:`.triton_lean_kernels`), bit-identical to the
reference's lean step, with the same table residency, capturable scalars and delegation.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from . import reference
from ._plan import (batch_addresses, by_dtype, chunk_table, gradient_addresses, noted_gradient_addresses,
                    owned_addresses, partition, scalar_tables, sizes_of)
from ._staging import Staging
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

try:
    import triton

    from . import triton_kernels as K

    AVAILABLE = True
except ImportError:  # triton is optional (extra "gpu")
    AVAILABLE = False

CAPTURABLE = True  # steps batches with device scalars (batch.on_device) without a host synchronisation
LEAN = True  # steps lean batches (codec-format moments, Kahan-compensated weights) bit-identically: triton_lean

__all__ = ["AVAILABLE", "CAPTURABLE", "LEAN", "supports_device", "phase1_batch", "plan_phase1", "phase2_batch",
           "lamb_step", "grad_sum_of_squares"]

BLOCK = 1024  # elements per program (H200 sweep: benchmarks/gpu_kernels.py)
NUM_WARPS = 4
RBLOCK = 256  # blocks summed at once by the per-tensor reduction
STEP_BLOCK = 256  # step counts advanced per program
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports_device(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreted()


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _options() -> dict:
    # FMA contraction would change float32 results; the interpreter never fuses (and takes no such options)
    return {} if _interpreted() else {"enable_fp_fusion": False, "num_warps": NUM_WARPS}


def _delegated(part: tuple) -> bool:
    """float64 arithmetic and half-precision moments: partitions the reference backend steps."""
    src_dtype, _, m_dtype, _, _ = part
    return src_dtype == torch.float64 or m_dtype != torch.float32


@functools.lru_cache(maxsize=64)
def _device_blocks(key: bytes, device: torch.device, block: int):
    """(tensor of each block int32, first block of each tensor int32, sizes int64) on ``device``, cached
    per set of sizes."""
    sizes = np.frombuffer(key, dtype=np.int64)
    chunks = chunk_table(sizes, block)
    return (torch.from_numpy(chunks.tensor.astype(np.int32)).to(device),
            torch.from_numpy(chunks.first.astype(np.int32)).to(device),
            torch.from_numpy(sizes.copy()).to(device), len(chunks.tensor))


def _upload(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """``host`` (int64) on ``device``: one copy from pinned memory, not waited for (the caching host
    allocator keeps the pinned block until the copy is done)."""
    t = torch.from_numpy(host)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class _Resident:
    """A host table kept on the device between steps, uploaded again only when its content changes.

    Under CUDA graph capture the upload becomes a copy node of the graph, which reads its pinned
    source at every replay: that source must be allocated before the capture and outlive the
    graph.  Each eager upload therefore sets a pinned buffer of the same size aside, which a
    capture then fills and keeps (capture needs an eager warm-up step, as ``torch.cuda.graph``
    does anyway).
    """

    def __init__(self) -> None:
        self.key: Optional[bytes] = None
        self.device_table: Optional[torch.Tensor] = None
        self.spare: Optional[torch.Tensor] = None
        self.kept: List[torch.Tensor] = []  # what captured graphs read (and their device tables)

    def get(self, host: np.ndarray, device: torch.device) -> torch.Tensor:
        key = host.tobytes()
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if key == self.key:
            if capturing and not any(t is self.device_table for t in self.kept):
                self.kept.append(self.device_table)
            return self.device_table
        if capturing:
            if self.spare is None or self.spare.numel() != host.size:
                raise RuntimeError("mplamb: a step is being captured in a CUDA graph before any eager step of these "
                                   "parameters: run one eager step first (a warm-up, as torch.cuda.graph requires)")
            self.spare.numpy()[:] = host
            table = torch.empty(host.size, dtype=torch.int64, device=device)
            table.copy_(self.spare, non_blocking=True)
            self.kept += [self.spare, table]
            self.spare = None
        else:
            table = _upload(host.copy(), device)
            if device.type == "cuda" and (self.spare is None or self.spare.numel() != host.size):
                self.spare = torch.empty(host.size, dtype=torch.int64, pin_memory=True)
        self.key, self.device_table = key, table
        return table


def _resident(memo: Optional[dict], slot: tuple, host: np.ndarray, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` through the :class:`_Resident` in ``memo[slot]`` (a plain upload without a memo)."""
    if memo is None:
        return _upload(host, device)
    res = memo.get(slot)
    if res is None:
        res = memo[slot] = _Resident()
    return res.get(host, device)


class _Launch:
    """One partition's tables on the device: addresses and scalar rows (``table``), blocks, sizes."""

    def __init__(self, idx: List[int], kinds: tuple, table: torch.Tensor, n: int, blocks: tuple) -> None:
        self.idx, self.kinds, self.table = idx, kinds, table
        self.scal_at, self.bias_at = 6 * n, 14 * n
        self.tid, self.first, self.sizes, self.nblocks = blocks

    def args(self) -> tuple:
        return (self.table, self.table.view(torch.float64), self.scal_at, self.bias_at, self.tid, self.first,
                self.sizes)


def _sum_blocks(partial: torch.Tensor, first: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    out = torch.empty(rows, n, dtype=torch.float64, device=partial.device)
    if n:
        K.sum_blocks_kernel[(n,)](partial, first, out, n, COLS=partial.shape[1], ROWS=rows, RBLOCK=RBLOCK)
    return out


def _device_of(batch: LambBatch) -> torch.device:
    return batch.weights[0].device


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 of every tensor (one launch per partition) and the local squared norms, reduced on the device."""
    return plan_phase1(batch, dry=dry)()


def plan_phase1(batch: LambBatch, dry: bool = False) -> Callable[[], Phase1Result]:
    """Phase 1 prepared: every partition's addresses and scalar rows gathered and uploaded now (the
    per-tensor host work); the returned callable launches the kernels (and steps the partitions
    delegated to the reference).  Nothing the step writes is touched before it runs.  Lean batches:
    :func:`.triton_lean.plan_phase1`."""
    if batch.lean:
        from . import triton_lean

        return triton_lean.plan_phase1(batch, dry=dry)
    return planned_phase1(batch, dry, partition(batch), _delegated, _launch, _run_phase1)


def _run_phase1(launch: "_Launch", rescale: Optional[torch.Tensor], dev: Optional[tuple], dry: bool) -> torch.Tensor:
    """Phase 1's kernel over ``launch``'s blocks; its per-block partial sums."""
    partial = torch.empty(max(launch.nblocks, 1), 3, dtype=torch.float64, device=launch.table.device)
    if launch.nblocks:
        K.phase1_kernel[(launch.nblocks,)](
            *launch.args(), launch.table if rescale is None else rescale, partial,
            *(dev or (launch.table, 0, launch.table)),
            W_KIND=launch.kinds[0], G_KIND=launch.kinds[1], RESCALE_FROM_PTR=rescale is not None,
            WRITE=not dry, DEVICE_T=dev is not None, SKIP_FROM_PTR=dev is not None, BLOCK=BLOCK, **_options())
    return partial


def planned_phase1(batch: LambBatch, dry: bool, parts: dict, delegated: Callable[[tuple], bool],
                   prepare: Callable, run_kernel: Callable) -> Callable[[], Phase1Result]:
    """The skeleton of a prepared phase 1 shared by the full-state and the lean launches: for each partition
    ``key -> idx`` of ``parts``, either the sub-batch the reference steps (``delegated(key)``) or the launch
    ``prepare(batch, key, idx, stage, noted, device)`` made now; the returned callable runs them
    (``run_kernel(launch, rescale, dev, dry)`` launches one and returns its per-program partial sums, which
    are reduced per tensor on the device) and gathers the local squared norms."""
    n = len(batch.weights)
    rows = 3 if dry else 2
    if n == 0:
        return lambda: Phase1Result(torch.zeros(rows, 0, dtype=torch.float64), [], dry=dry)
    device = _device_of(batch)
    stage = Staging()
    noted = noted_gradient_addresses(batch)
    rescale = batch.rescale.to(device=device, dtype=torch.float32) if batch.rescale is not None else None
    dev = _device_args(batch)
    with _on(device):
        prepared = [(idx, batch if len(parts) == 1 else batch.select(idx)) if delegated(key)
                    else (idx, prepare(batch, key, idx, stage, noted, device)) for key, idx in parts.items()]

    def run() -> Phase1Result:
        launches = []
        sumsq = None
        with _on(device):
            for idx, item in prepared:
                if isinstance(item, LambBatch):
                    launch = _Delegated(idx, item, reference.phase1_batch(item, dry=dry))
                    part_sumsq = launch.p1.sumsq
                else:
                    launch = item
                    part_sumsq = _sum_blocks(run_kernel(launch, rescale, dev, dry), launch.first, len(idx), rows)
                if len(prepared) == 1:
                    sumsq = part_sumsq
                else:
                    if sumsq is None:
                        sumsq = torch.empty(rows, n, dtype=torch.float64, device=device)
                    sumsq[:, torch.as_tensor(idx, device=device)] = part_sumsq
                launches.append(launch)
        return Phase1Result(sumsq=sumsq, carry=(launches, stage, rescale, dev), dry=dry)

    return run


def _device_args(batch: LambBatch) -> Optional[tuple]:
    """(bias table, its last row, skip flag as uint8) of a capturable batch; None otherwise."""
    on = batch.on_device
    if on is None:
        return None
    return on.bias, on.bias.shape[0] - 1, on.skip.view(torch.uint8)


def _launch(batch: LambBatch, part: tuple, idx: List[int], stage: Staging, noted: Optional[tuple],
            device: torch.device) -> "_Launch":
    """The device tables of one partition: addresses and scalar rows uploaded at once, cached blocks."""
    src_dtype, g_dtype, _, has_master, o_dtype = part
    w, g, m, v, o, sz = batch_addresses(batch, part, idx, stage, noted)
    scal, bias = scalar_tables(batch, idx, np.float64, None)
    k = len(idx)
    if batch.on_device is not None:  # step counts on the device: their addresses, and no per-step rows
        steps = batch.on_device.steps
        counts, _ = owned_addresses(("step",) + part, steps if k == len(steps) else [steps[i] for i in idx], stage,
                                    batch.memo)
        bias = np.zeros_like(bias)
    else:
        counts = np.zeros(k, dtype=np.int64)
    host = np.empty(18 * k, dtype=np.int64)
    host[:6 * k].reshape(k, 6)[:] = np.stack([w, g, m, v, o, counts], axis=1)
    host[6 * k:].view(np.float64)[:] = np.concatenate([scal.ravel(), bias.ravel()])
    table = _resident(batch.memo, ("table",) + part, host, device) if len(stage) == 0 else _upload(host, device)
    return _Launch(idx, (_KIND[src_dtype], _KIND[g_dtype], _KIND[o_dtype], has_master), table, k,
                   _graph_safe(batch.memo, _device_blocks(sz.tobytes(), device, BLOCK), device))


def _graph_safe(memo: Optional[dict], blocks: tuple, device: torch.device) -> tuple:
    """``blocks`` (cached tables), also held by ``memo`` while a CUDA graph that reads them is captured:
    the cache may drop them later, the graph never lets go."""
    if memo is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        memo.setdefault("graph_kept", []).append(blocks)
    return blocks


class _Delegated:
    """A partition stepped by the reference backend: its sub-batch and phase-1 result."""

    def __init__(self, idx: List[int], sub: LambBatch, p1: Phase1Result) -> None:
        self.idx, self.sub, self.p1 = idx, sub, p1


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 of every tensor (one launch per partition), then staged tensors copied back."""
    if batch.lean:
        from . import triton_lean

        return triton_lean.phase2_batch(batch, p1, steps)
    if not p1.carry:
        return None
    launches, stage, rescale, dev = p1.carry
    device = _device_of(batch)
    steps = steps.to(device)
    with _on(device):
        for launch in launches:
            part_steps = steps if len(launch.idx) == len(steps) else steps[torch.as_tensor(launch.idx, device=device)]
            if isinstance(launch, _Delegated):
                reference.phase2_batch(launch.sub, launch.p1, part_steps)
                continue
            if not launch.nblocks:
                continue
            w_kind, g_kind, o_kind, has_master = launch.kinds
            K.phase2_kernel[(launch.nblocks,)](
                *launch.args(), launch.table if rescale is None else rescale, part_steps,
                *(dev or (launch.table, 0, launch.table)),
                W_KIND=w_kind, G_KIND=g_kind, O_KIND=o_kind, WRITE_W=has_master,
                RESCALE_FROM_PTR=rescale is not None, RECOMPUTE=p1.dry, DEVICE_T=dev is not None,
                SKIP_FROM_PTR=dev is not None, BLOCK=BLOCK, **_options())
        if dev is not None:
            for launch in launches:
                if not isinstance(launch, _Delegated) and launch.idx:  # (delegated ones advanced their own)
                    k = len(launch.idx)
                    K.advance_steps_kernel[(triton.cdiv(k, STEP_BLOCK),)](launch.table, dev[2], k, BLOCK=STEP_BLOCK,
                                                                          STRIDE=6, COL=5, **_options())
    stage.finish()
    return None


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One fused LAMB step over ``batch`` on the GPU."""
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], memo: Optional[dict] = None) -> torch.Tensor:
    """Per-tensor ``sum(grad**2)`` in float64, shape ``(n,)``: one launch (plus its reduction) per dtype.

    With a ``memo``, the addresses are left there for phase 1 of the same step (see
    :func:`mplamb.kernels.fused_cpu.grad_sum_of_squares`).  float64 gradients go to the reference.
    """
    n = len(grads)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    device = grads[0].device
    out = None
    stage = Staging()
    groups = by_dtype(grads)
    with _on(device):
        for dtype, idx in groups.items():
            gs = grads if len(idx) == n else [grads[i] for i in idx]
            if dtype not in _KIND:
                part = reference.grad_sum_of_squares(gs).to(device)
            else:
                addr = gradient_addresses(grads, gs, stage, memo)
                tid, first, sizes, nblocks = _graph_safe(memo, _device_blocks(sizes_of(gs).tobytes(), device, BLOCK),
                                                         device)
                partial = torch.empty(max(nblocks, 1), 1, dtype=torch.float64, device=device)
                if nblocks:
                    table = _resident(memo, ("grads", dtype), addr, device) if not len(stage) else _upload(addr, device)
                    K.grad_sumsq_kernel[(nblocks,)](table, tid, first, sizes, partial,
                                                    G_KIND=_KIND[dtype], BLOCK=BLOCK, **_options())
                part = _sum_blocks(partial, first, len(idx), 1)[0]
            if len(groups) == 1:
                return part
            if out is None:
                out = torch.empty(n, dtype=torch.float64, device=device)
            out[torch.as_tensor(idx, device=device)] = part
    return out


def _on(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
