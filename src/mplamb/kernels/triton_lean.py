"""The Triton backend's lean step: launch logic for :mod:`.triton_lean_kernels`.

:mod:`.triton_gpu` hands every lean batch (``batch.lean``: moments in a :mod:`.codec` format,
Kahan-compensated weights) here.  Tensors are partitioned by (weight dtype, gradient dtype, weight
mode: plain / float32 master / Kahan compensation, and for the blocked formats the tile width);
each partition is one phase-1 launch (new codes and scales, per-program float64 partial sums of
``w**2``, ``g**2`` and in a dry phase 1 ``grad**2``) plus the per-tensor reduction of
:mod:`.triton_gpu`, and one phase-2 launch (the update recomputed from the stored codes, or after a
dry phase 1 from the old ones, and written with the codes).  The arithmetic is the reference's
(:func:`mplamb.kernels.reference.lean_update`), bit for bit; the kernels' docstring has it.

Per step the host builds one table (addresses, geometry, dither seed and scalar rows of every tensor:
:mod:`.triton_lean_kernels`) and uploads it when its content changed (:class:`.triton_gpu._Resident`).
A capturable batch (``batch.on_device``) reads its step counts (and from them the bias corrections and
the dither seeds), lr and skip flag from the device, so its table does not change from step to step and
a CUDA graph can capture the step; phase 2 then advances the device step counts.

Delegated to the reference backend, per partition (:func:`_supported`): float64 weights or gradients,
an output of another dtype than its weight, a master that is not float32 or a master beside a
compensation, a compensation of another dtype than its weight, moments not held in the format's code
dtype.  None of these arises from ``mplamb.Lamb`` except float64 parameters (which keep float64 moments).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import triton

from . import codec, reference
from . import triton_kernels as K
from . import triton_lean_kernels as KL
from ._plan import addresses, noted_gradient_addresses, owned_addresses, scalar_tables, sizes_of
from ._staging import Staging
from .contract import LambBatch, Phase1Result
from .triton_gpu import (STEP_BLOCK, _Delegated, _device_args, _device_blocks, _graph_safe, _KIND, _on, _options,
                         _resident, _sum_blocks, _upload, planned_phase1)

__all__ = ["plan_phase1", "phase1_batch", "phase2_batch"]

_MIN_WIDTH = 16  # the narrowest tile row (2 * HALF) a launch uses


def _mode(batch: LambBatch, i: int) -> int:
    if batch.comps is not None and batch.comps[i] is not None:
        return KL.KAHAN
    return KL.MASTER if batch.masters[i] is not None else KL.PLAIN


def _supported(batch: LambBatch, i: int) -> bool:
    """Whether the kernels take tensor ``i``: float32/bfloat16/float16 weight and gradient, an output of the
    weight's dtype, a float32 master or a compensation of the weight's dtype (not both), moments in the
    format's code dtypes."""
    w, g, o, m = batch.weights[i], batch.grads[i], batch.outs[i], batch.masters[i]
    c = None if batch.comps is None else batch.comps[i]
    fmt = batch.moment_format
    if w.dtype not in _KIND or g.dtype not in _KIND or o.dtype != w.dtype:
        return False
    if (m is not None and (m.dtype != torch.float32 or c is not None)) or (c is not None and c.dtype != w.dtype):
        return False
    return batch.means[i].dtype == codec.code_dtype(fmt, "mean") and batch.vars[i].dtype == codec.code_dtype(fmt, "var")


def _width(fmt: str, shape: torch.Size) -> int:
    """The tile row of a blocked tensor: ``B``, or for rows shorter than ``B`` the next power of two
    (at least :data:`_MIN_WIDTH`): every block is then one whole row."""
    block = codec.BLOCK[fmt]
    length = codec.rows_and_length(shape)[1]
    return block if length >= block else max(_MIN_WIDTH, 1 << max(0, length - 1).bit_length())


def _partition(batch: LambBatch) -> Dict[tuple, List[int]]:
    """Tensors that share (weight dtype, grad dtype, weight mode, tile width): one launch each; the key
    ``("reference",)`` collects those delegated to the reference."""
    parts: Dict[tuple, List[int]] = {}
    blocked = batch.moment_format in codec.BLOCKED
    for i, w in enumerate(batch.weights):
        if not _supported(batch, i):
            key: tuple = ("reference",)
        else:
            key = (w.dtype, batch.grads[i].dtype, _mode(batch, i),
                   _width(batch.moment_format, w.shape) if blocked else 0)
        parts.setdefault(key, []).append(i)
    return parts


class _LeanLaunch:
    """One partition's table on the device, its program table, and the kernels' constexprs."""

    def __init__(self, idx: List[int], table: torch.Tensor, blocks: tuple, meta: dict, levels: tuple) -> None:
        self.idx, self.table, self.meta, self.levels = idx, table, meta, levels
        self.tid, self.first, _, self.nprog = blocks
        self.blocked = "B" in meta

    def args(self) -> tuple:
        return self.table, self.table.view(torch.float64), self.tid, self.first


def _launch(batch: LambBatch, key: tuple, idx: List[int], stage: Staging, noted: Optional[tuple],
            device: torch.device) -> _LeanLaunch:
    """The device tables of one partition (``key`` of :func:`_partition`)."""
    w_dtype, g_dtype, mode, width = key
    fmt = batch.moment_format
    blocked = fmt in codec.BLOCKED
    k = len(idx)
    everything = k == len(batch.weights)

    def pick(xs):
        return xs if everything else [xs[i] for i in idx]

    memo = batch.memo
    part = ("triton_lean", fmt) + key
    weights, outs = pick(batch.weights), pick(batch.outs)
    inplace = [o is w for o, w in zip(outs, weights)]  # (a master's or Kahan weight is written as the output)
    host = np.zeros((k, KL.ROW.value), dtype=np.int64)
    col = {name: getattr(KL, name).value for name in ("A_W", "A_C", "A_MST", "A_G", "A_M", "A_V", "A_MS", "A_VS",
                                                      "A_O", "A_CNT", "G_NUMEL", "G_ROWS", "G_LEN", "G_NB",
                                                      "G_HALF", "G_SEED", "G_OFFSET", "S_SCAL", "S_BIAS")}
    w_addr = addresses(weights, stage, inplace)
    host[:, col["A_W"]] = w_addr
    host[:, col["A_O"]] = w_addr if all(inplace) else addresses(outs, stage)
    # the master and the compensation where the mode has them; elsewhere never read (the weight's address)
    host[:, col["A_MST"]] = (owned_addresses(("master",) + part, pick(batch.masters), stage, memo)[0]
                             if mode == KL.MASTER else w_addr)
    host[:, col["A_C"]] = (owned_addresses(("comp",) + part, pick(batch.comps), stage, memo)[0]
                           if mode == KL.KAHAN else w_addr)
    if everything and noted is not None and noted[0] is batch.grads:  # from this step's gradient pass
        host[:, col["A_G"]] = noted[1]
    else:
        host[:, col["A_G"]] = addresses(pick(batch.grads), stage, [False] * k)
    host[:, col["A_M"]] = owned_addresses(("mean",) + part, pick(batch.means), stage, memo)[0]
    host[:, col["A_V"]] = owned_addresses(("var",) + part, pick(batch.vars), stage, memo)[0]
    sizes = sizes_of(weights)
    host[:, col["G_NUMEL"]] = sizes
    on = batch.on_device
    if on is not None:  # step counts on the device: their addresses; bias rows and seeds derived there
        steps = on.steps if everything else [on.steps[i] for i in idx]
        host[:, col["A_CNT"]] = owned_addresses(("step",) + part, steps, stage, memo)[0]
    scal, bias = scalar_tables(batch, idx, np.float64, None)
    nums = host.view(np.float64)
    nums[:, col["S_SCAL"]:col["S_SCAL"] + 8] = scal
    nums[:, col["S_BIAS"]:col["S_BIAS"] + 4] = 0.0 if on is not None else bias
    meta = dict(W_KIND=_KIND[w_dtype], G_KIND=_KIND[g_dtype], MODE=mode)
    levels: tuple = ()
    if blocked:
        block = codec.BLOCK[fmt]
        geo = np.array([codec.rows_and_length(w.shape) for w in weights], dtype=np.int64).reshape(-1, 2)
        nb = -(-geo[:, 1] // block)
        host[:, col["G_ROWS"]], host[:, col["G_LEN"]], host[:, col["G_NB"]] = geo[:, 0], geo[:, 1], nb
        host[:, col["G_HALF"]] = (geo[:, 1] + 1) // 2
        host[:, col["A_MS"]] = owned_addresses(("mean_scale",) + part, pick(batch.mean_scales), stage, memo)[0]
        host[:, col["A_VS"]] = owned_addresses(("var_scale",) + part, pick(batch.var_scales), stage, memo)[0]
        offsets = batch.dither_offsets()
        offsets = np.array(offsets if everything else [offsets[i] for i in idx], dtype=np.int64)
        host[:, col["G_OFFSET"]] = offsets & 0xFFFFFFFF
        if on is None:  # the dither's ((t mod 2**31) * 0x9E3779B9 + offset) mod 2**32 of each tensor's step t
            counts = batch.step_counts()
            ts = np.array([int(counts[i]) & 0x7FFFFFFF for i in idx], dtype=np.uint64)
            host[:, col["G_SEED"]] = ((ts * np.uint64(0x9E3779B9) + offsets.astype(np.uint64))
                                      & np.uint64(0xFFFFFFFF)).astype(np.int64)
        nblk = KL.TILE // width
        meta.update(PACKED=fmt == "4bit", B=block, NBLK=nblk, HALF=width // 2)
        n_levels, k_levels = codec.MEAN_LEVELS[fmt], codec.VAR_LEVELS[fmt]
        inv_n = float(torch.tensor(1.0 / n_levels, dtype=torch.float32))  # RN(1/N), as the codec
        levels = (inv_n, 1.0 / k_levels, float(n_levels), float(k_levels))
        blocks = _device_blocks((geo[:, 0] * nb).astype(np.int64).tobytes(), device, nblk)
    else:
        meta.update(M_KIND=_KIND[codec.code_dtype(fmt, "mean")], BLOCK=KL.BLOCK)
        blocks = _device_blocks(sizes.tobytes(), device, KL.BLOCK)
    flat = host.reshape(-1)
    table = _resident(memo, ("lean_table",) + part, flat, device) if len(stage) == 0 else _upload(flat, device)
    return _LeanLaunch(idx, table, _graph_safe(memo, blocks, device), meta, levels)


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 of every tensor of a lean batch (one launch per partition) and the local squared norms."""
    return plan_phase1(batch, dry=dry)()


def plan_phase1(batch: LambBatch, dry: bool = False) -> Callable[[], Phase1Result]:
    """Phase 1 of a lean batch prepared (see :func:`.triton_gpu.plan_phase1`): tables gathered and uploaded
    now, kernels launched (and delegated partitions stepped by the reference) by the returned callable."""
    return planned_phase1(batch, dry, _partition(batch), lambda key: key == ("reference",), _launch, _run_phase1)


def _run_phase1(launch: _LeanLaunch, rescale: Optional[torch.Tensor], dev: Optional[tuple], dry: bool) -> torch.Tensor:
    """Phase 1's kernel over ``launch``'s programs; their partial sums."""
    partial = torch.empty(max(launch.nprog, 1), 3, dtype=torch.float64, device=launch.table.device)
    if launch.nprog:
        kernel = KL.phase1_blocked_kernel if launch.blocked else KL.phase1_elementwise_kernel
        kernel[(launch.nprog,)](
            *launch.args(), launch.table if rescale is None else rescale, partial,
            *(dev or (launch.table, 0, launch.table)), *launch.levels,
            RESCALE_FROM_PTR=rescale is not None, WRITE=not dry, DEVICE_T=dev is not None,
            SKIP_FROM_PTR=dev is not None, **launch.meta, **_options())
    return partial


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 of a lean batch (one launch per partition), the device step counts advanced (capturable),
    then staged tensors copied back."""
    if not p1.carry:
        return None
    launches, stage, rescale, dev = p1.carry
    device = batch.weights[0].device
    steps = steps.to(device)
    with _on(device):
        for launch in launches:
            part_steps = steps if len(launch.idx) == len(steps) else steps[torch.as_tensor(launch.idx, device=device)]
            if isinstance(launch, _Delegated):
                reference.phase2_batch(launch.sub, launch.p1, part_steps)  # (advances its own step counts)
                continue
            if not launch.nprog:
                continue
            kernel = KL.phase2_blocked_kernel if launch.blocked else KL.phase2_elementwise_kernel
            kernel[(launch.nprog,)](
                *launch.args(), launch.table if rescale is None else rescale, part_steps,
                *(dev or (launch.table, 0, launch.table)), *launch.levels,
                RESCALE_FROM_PTR=rescale is not None, RECOMPUTE=p1.dry, DEVICE_T=dev is not None,
                SKIP_FROM_PTR=dev is not None, **launch.meta, **_options())
        if dev is not None:
            for launch in launches:
                if not isinstance(launch, _Delegated) and launch.idx:
                    k = len(launch.idx)
                    K.advance_steps_kernel[(triton.cdiv(k, STEP_BLOCK),)](
                        launch.table, dev[2], k, BLOCK=STEP_BLOCK, STRIDE=KL.ROW.value, COL=KL.A_CNT.value,
                        **_options())
    stage.finish()
    return None
