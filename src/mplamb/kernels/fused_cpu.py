"""The fused CPU backend: two multi-threaded passes per step (numba), bounded temporaries.

Launch logic for :mod:`.fused_cpu_kernels`.  Tensors are handed to the kernels as raw
addresses, so a step costs no per-tensor Python work beyond collecting addresses and
one scalar table.  Tensors the kernels cannot take directly are handled explicitly:

* non-contiguous gradients (read only) are copied to contiguous memory;
* non-contiguous tensors that the step writes go through a contiguous temporary that is
  copied back after the step (never a silent copy that the update would land on);
* float16/bfloat16 *moments* (only the operators' float16-without-master form, D6) are
  delegated to the reference backend.

Lean batches (``batch.lean``: moments in a :mod:`.codec` format, Kahan-compensated weights) run the
kernels of :mod:`.fused_cpu_lean_kernels`, bit-identical to the reference's lean step; the rare
combinations they do not take (float64 tensors or gradients, an output or compensation of another
dtype than its weight, device step counts) are delegated to the reference.

Arithmetic is bit-identical to :mod:`.reference` (same operations, same order, no FMA).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

import torch

from .._validate import HALF_DTYPES
from . import codec, reference
from ._plan import (addresses, batch_addresses, block_table, by_dtype, chunk_table, gradient_addresses,
                    noted_gradient_addresses, owned_addresses, partition, scalar_tables, sizes_of)
from ._staging import Staging as _Staging
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

try:
    import numpy as np
    import numba

    from . import fused_cpu_kernels as K
    from . import fused_cpu_lean_kernels as KL

    AVAILABLE = True
except ImportError:  # numba is an optional dependency (extra "fast")
    AVAILABLE = False

LEAN = True  # steps lean batches (moments in a codec format, Kahan-compensated weights), bit-identical

__all__ = ["AVAILABLE", "LEAN", "supports_device", "phase1_batch", "phase2_batch", "lamb_step", "grad_sum_of_squares",
           "warm_up"]


def supports_device(device: torch.device) -> bool:
    return device.type == "cpu"


if AVAILABLE:
    _MARK = {torch.float32: np.float32(0), torch.float64: np.float64(0),
             torch.bfloat16: np.uint16(0), torch.float16: np.int16(0)}


def _threads() -> None:
    """numba's thread count for this thread: torch's, within numba's pool (set only when it differs:
    setting it costs more than a small step's kernel).

    Starting numba's OpenMP pool (the first time numba's threads are asked for) sets the process-wide
    OpenMP thread count to numba's pool size, which torch reads as its own intra-op thread count: it
    is put back at once, so the process keeps the thread count it had (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``)."""
    torch_threads = torch.get_num_threads()
    want = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def bias_regime(bias: "np.ndarray") -> Tuple["np.ndarray", object]:
    """The cheapest exact bias-correction loop for the rows ``bias`` = (bias1, bias2, 1/bias1,
    1/bias2) of one launch (a ``BIAS_*`` marker of :mod:`.fused_cpu_kernels`), and the rows it reads.

    A division is skipped only when its divisor is exactly 1 in every row, so no bit changes: rows
    without bias correction (bias1 = 0) become divisions by 1, and late steps have divisors that
    rounded to 1 (see the kernels' module)."""
    off = bias[:, 0] == 0.0
    if off.any():
        bias = bias.copy()
        bias[off] = 1.0
    if not (bias[:, 0] == 1.0).all():
        return bias, K.BIAS_BOTH
    return bias, (K.BIAS_NONE if (bias[:, 1] == 1.0).all() else K.BIAS_VAR)


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 of every tensor of ``batch`` and its local squared norms (one parallel pass per dtype;
    ``dry``: nothing written, the gradients' squared norms added as a third row)."""
    if batch.lean:
        if not _lean_supported(batch):
            p1 = reference.phase1_batch(batch, dry=dry)
            return Phase1Result(p1.sumsq, ("reference", p1), dry=dry)
        return _lean_phase1_batch(batch, dry)
    if (batch.means[0].dtype in HALF_DTYPES if batch.uniform else any(m.dtype in HALF_DTYPES for m in batch.means)):
        p1 = reference.phase1_batch(batch, dry=dry)
        return Phase1Result(p1.sumsq, ("reference", p1), dry=dry)
    _threads()
    n = len(batch.weights)
    stage = _Staging()
    plans = []
    sumsq = np.zeros((3 if dry else 2, n), dtype=np.float64)
    noted = noted_gradient_addresses(batch)
    override = None if batch.rescale is None else float(batch.rescale)
    for part, idx in partition(batch).items():
        src_dtype, g_dtype, m_dtype, has_master, o_dtype = part
        w_addr, g_addr, m_addr, v_addr, o_addr, sz = batch_addresses(batch, part, idx, stage, noted)
        ct, cs, cl, _ = chunk_table(sz, K.CHUNK)
        # clipping off is a clip at +inf: the kernels clip every element with no branch, and clipping
        # at +inf changes nothing (NaN included)
        scal, bias = scalar_tables(batch, idx, np.float64 if m_dtype == torch.float64 else np.float32, override,
                                   clip_off=np.inf)
        bias, regime = bias_regime(bias)
        partial = np.empty((ct.shape[0], 3), dtype=np.float64)
        scratch = np.empty((numba.config.NUMBA_NUM_THREADS, K.CHUNK), dtype=scal.dtype)  # one chunk per thread
        K.phase1_pass(w_addr, g_addr, m_addr, v_addr, sz, _MARK[src_dtype], _MARK[g_dtype],
                      _MARK[m_dtype], scal, bias, ct, cs, cl, partial, scratch, not dry, regime)
        sumsq[:, idx] = K.sum_chunks(partial, ct, len(idx))[:sumsq.shape[0]]
        plans.append((idx, w_addr, g_addr, m_addr, v_addr, o_addr, sz, src_dtype, g_dtype, m_dtype, o_dtype,
                      has_master, scal, bias, regime, ct, cs, cl))
    return Phase1Result(sumsq=torch.from_numpy(sumsq), carry=(plans, stage), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 of every tensor of ``batch`` (one parallel pass per dtype), then staged tensors copied back."""
    if isinstance(p1.carry, tuple) and p1.carry[0] == "reference":
        return reference.phase2_batch(batch, p1.carry[1], steps)
    if batch.lean:
        return _lean_phase2_batch(batch, p1, steps)
    plans, stage = p1.carry
    steps_np = steps.cpu().numpy()
    for (idx, w_addr, g_addr, m_addr, v_addr, o_addr, sz, src_dtype, g_dtype, m_dtype, o_dtype, has_master,
         scal, bias, regime, ct, cs, cl) in plans:
        steps_i = np.ascontiguousarray(steps_np[idx])
        marks = (_MARK[src_dtype], _MARK[g_dtype], _MARK[m_dtype])
        if has_master:
            K.phase2_master_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sz, *marks, _MARK[o_dtype], scal, bias,
                                 steps_i, ct, cs, cl, p1.dry, regime)
        elif np.array_equal(w_addr, o_addr) and src_dtype == o_dtype:
            K.phase2_inplace_pass(w_addr, g_addr, m_addr, v_addr, sz, *marks, scal, bias, steps_i, ct, cs, cl,
                                  p1.dry, regime)
        else:
            K.phase2_out_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sz, *marks, _MARK[o_dtype], scal, bias,
                              steps_i, ct, cs, cl, p1.dry, regime)
    stage.finish()
    return None


# ------------------------------------------------------------------ lean batches

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _lean_supported(batch: LambBatch) -> bool:
    """Whether the lean kernels take ``batch``: float32/bfloat16/float16 weights and gradients, outputs and
    compensations of their weight's dtype, float32 masters, host step counts."""
    if batch.on_device is not None:
        return False
    comps = batch.comps or [None] * len(batch.weights)
    for w, g, o, m, c in zip(batch.weights, batch.grads, batch.outs, batch.masters, comps):
        if w.dtype not in _FLOAT or g.dtype not in _FLOAT or o.dtype != w.dtype:
            return False
        if (m is not None and (m.dtype != torch.float32 or c is not None)) or (c is not None and c.dtype != w.dtype):
            return False
    return True


def _lean_partition(batch: LambBatch) -> dict:
    """Tensors that share (weight dtype, grad dtype, weight mode): one launch each."""
    parts: dict = {}
    comps = batch.comps or [None] * len(batch.weights)
    for i, (w, g, o, m, c) in enumerate(zip(batch.weights, batch.grads, batch.outs, batch.masters, comps)):
        mode = KL.KAHAN if c is not None else (KL.MASTER if m is not None else KL.PLAIN)
        parts.setdefault((w.dtype, g.dtype, mode), []).append(i)
    return parts


def _lean_plan(batch: LambBatch, key: tuple, idx: list, stage: "_Staging", noted) -> dict:
    """Addresses, tables and launch arguments of one lean partition (``key`` of :func:`_lean_partition`)."""
    w_dtype, g_dtype, mode = key
    fmt = batch.moment_format
    everything = len(idx) == len(batch.weights)

    def pick(xs):
        return xs if everything else [xs[i] for i in idx]

    memo = batch.memo
    part = ("lean", fmt) + key
    m_addr, _ = owned_addresses(("mean",) + part, pick(batch.means), stage, memo)
    v_addr, _ = owned_addresses(("var",) + part, pick(batch.vars), stage, memo)
    weights, outs = pick(batch.weights), pick(batch.outs)
    inplace = [o is w for o, w in zip(outs, weights)]  # (a master's weight is only written)
    w_addr = addresses(weights, stage, inplace)
    o_addr = w_addr if all(inplace) else addresses(outs, stage)
    # the master and the compensation where the mode has them; elsewhere never read (the weight's address)
    mst_addr = owned_addresses(("master",) + part, pick(batch.masters), stage, memo)[0] if mode == KL.MASTER else w_addr
    c_addr = owned_addresses(("comp",) + part, pick(batch.comps), stage, memo)[0] if mode == KL.KAHAN else w_addr
    if everything and noted is not None and noted[0] is batch.grads:
        g_addr = noted[1]
    else:
        g_addr = addresses(pick(batch.grads), stage, [False] * len(idx))
    sz = sizes_of(weights)
    override = None if batch.rescale is None else float(batch.rescale)
    scal, bias = scalar_tables(batch, idx, np.float32, override, clip_off=np.inf)
    bias, regime = bias_regime(bias)
    flags = np.array([regime is K.BIAS_BOTH, regime is not K.BIAS_NONE, fmt in codec.FACTORED], dtype=np.bool_)
    plan = dict(idx=idx, w=w_addr, c=c_addr, mst=mst_addr, g=g_addr, m=m_addr, v=v_addr, o=o_addr, sizes=sz, mode=mode,
                w_mark=_MARK[w_dtype], g_mark=_MARK[g_dtype], scal=scal, bias=bias, flags=flags)
    if fmt in codec.BLOCKED:
        shapes = [codec.rows_and_length(w.shape) for w in weights]
        geo = np.array([(n, r, length, -(-length // codec.BLOCK[fmt]), (length + 1) // 2)
                        for n, (r, length) in zip(sz.tolist(), shapes)], dtype=np.int64).reshape(-1, 5)
        counts, offsets = batch.step_counts(), batch.dither_offsets()
        # the dither's (j + t * 0x9E3779B9) mod 2**32, j = offset + the local index: t's and offset's terms in one
        seeds = np.array([(((int(counts[i]) & 0x7FFFFFFF) * 0x9E3779B9) + int(offsets[i])) & 0xFFFFFFFF for i in idx],
                         dtype=np.int64)
        n_levels, k_levels = codec.MEAN_LEVELS[fmt], codec.VAR_LEVELS[fmt]
        plan.update(ms=owned_addresses(("mean_scale",) + part, pick(batch.mean_scales), stage, memo)[0],
                    vs=owned_addresses(("var_scale",) + part, pick(batch.var_scales), stage, memo)[0],
                    geo=geo, seeds=seeds, block=codec.BLOCK[fmt], table=block_table(shapes, codec.BLOCK[fmt], KL.CHUNK),
                    lev=np.array([n_levels, k_levels, 1.0 / n_levels, 1.0 / k_levels],  # RN(1/N) as codec
                                 dtype=np.float32),
                    f_mark=np.int8(0) if fmt == "8bit" else np.uint8(0))
    else:
        plan.update(table=chunk_table(sz, KL.CHUNK), m_mark=_MARK[torch.bfloat16 if fmt == "bf16" else torch.float32])
    return plan


def _lean_scratch() -> tuple:
    threads = numba.config.NUMBA_NUM_THREADS
    return np.empty((threads, 4, KL.CHUNK), dtype=np.float32), np.empty((threads, 2, KL.CHUNK), dtype=np.int32)


def _lean_phase1_batch(batch: LambBatch, dry: bool) -> Phase1Result:
    """Phase 1 of a lean batch (:mod:`.fused_cpu_lean_kernels`; ``dry``: nothing written)."""
    _threads()
    stage = _Staging()
    plans = []
    sumsq = np.zeros((3 if dry else 2, len(batch.weights)), dtype=np.float64)
    noted = noted_gradient_addresses(batch)
    fscratch, iscratch = _lean_scratch()
    for key, idx in _lean_partition(batch).items():
        p = _lean_plan(batch, key, idx, stage, noted)
        ct, cs, cl, _ = p["table"]
        partial = np.empty((ct.shape[0], 3), dtype=np.float64)
        if "geo" in p:
            KL.phase1_blocked_pass(p["w"], p["c"], p["mst"], p["g"], p["m"], p["v"], p["ms"], p["vs"], p["geo"],
                                   p["seeds"], p["w_mark"], p["g_mark"], p["f_mark"], p["scal"], p["bias"], p["lev"],
                                   p["block"], ct, cs, cl, partial, fscratch, iscratch, p["mode"], not dry)
        else:
            KL.phase1_elementwise_pass(p["w"], p["c"], p["mst"], p["g"], p["m"], p["v"], p["sizes"], p["w_mark"],
                                       p["g_mark"], p["m_mark"], p["scal"], p["bias"], p["flags"], ct, cs, cl, partial,
                                       fscratch, p["mode"], not dry)
        sumsq[:, idx] = K.sum_chunks(partial, ct, len(idx))[:sumsq.shape[0]]
        plans.append(p)
    return Phase1Result(sumsq=torch.from_numpy(sumsq), carry=(plans, stage), dry=dry)


def _lean_phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 of a lean batch, then staged tensors copied back."""
    plans, stage = p1.carry
    steps_np = steps.cpu().numpy()
    fscratch, iscratch = _lean_scratch()
    for p in plans:
        st = np.ascontiguousarray(steps_np[p["idx"]])
        ct, cs, cl, _ = p["table"]
        if "geo" in p:
            KL.phase2_blocked_pass(p["w"], p["c"], p["mst"], p["g"], p["m"], p["v"], p["ms"], p["vs"], p["o"],
                                   p["geo"], p["seeds"], p["w_mark"], p["g_mark"], p["f_mark"], p["scal"], p["bias"],
                                   p["lev"], st, p["block"], ct, cs, cl, fscratch, iscratch, p["mode"],
                                   p1.dry)
        else:
            KL.phase2_elementwise_pass(p["w"], p["c"], p["mst"], p["g"], p["m"], p["v"], p["o"], p["sizes"],
                                       p["w_mark"], p["g_mark"], p["m_mark"], p["scal"], p["bias"], p["flags"], st,
                                       ct, cs, cl, fscratch, p["mode"], p1.dry)
    stage.finish()


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One fused LAMB step over ``batch`` (see :class:`~mplamb.kernels.contract.LambBatch`)."""
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], memo: Optional[dict] = None) -> torch.Tensor:
    """Per-tensor ``sum(grad**2)`` in float64, shape ``(n,)`` (one parallel pass).

    With a ``memo`` (the batch memo of :class:`LambBatch`), the addresses of ``grads`` are left
    there for phase 1 of the same step, which takes them only if its ``batch.grads`` is this very
    list object (a new list every step) and removes them.
    """
    n = len(grads)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return torch.from_numpy(out)
    _threads()
    stage = _Staging()
    for dtype, idx in by_dtype(grads).items():
        gs = grads if len(idx) == n else [grads[i] for i in idx]
        sizes = sizes_of(gs)
        ct, cs, cl, _ = chunk_table(sizes, K.CHUNK)
        partial = np.empty((ct.shape[0], 1), dtype=np.float64)
        addr = gradient_addresses(grads, gs, stage, memo)
        K.grad_sumsq_pass(addr, sizes, _MARK[dtype], ct, cs, cl, partial)
        out[idx] = K.sum_chunks(partial, ct, len(idx))[0]
    return torch.from_numpy(out)


def warm_up(dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16, torch.float64),
            steps: Sequence[int] = (1, 1000, 10**6)) -> None:
    """Compile (or load from numba's on-disk cache) the kernels for the usual dtype combinations, at
    step counts that take every bias-correction loop at MXNet's betas (t = 1: both divisions; 1000:
    the variance's only; 10**6: none), so that no compilation waits at step 356 of a training run."""
    from .._scalars import phase1_scalars

    for dt in dtypes:
        master = dt in HALF_DTYPES
        mdt = torch.float64 if dt == torch.float64 else torch.float32
        for t in steps:
            w = torch.zeros(3, dtype=dt)
            src = w.float() if master else w
            sc = phase1_scalars(t=t, wd=0.0, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                                rescale_grad=1.0, clip_gradient=-1.0, dtype=mdt)
            batch = LambBatch(weights=[w], grads=[torch.zeros(3, dtype=dt)], means=[torch.zeros(3, dtype=mdt)],
                              vars=[torch.zeros(3, dtype=mdt)], masters=[src if master else None], outs=[w],
                              scalars=[sc], lrs=[0.0])
            lamb_step(batch)
        grad_sum_of_squares([w])
