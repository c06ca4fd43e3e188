"""The fused CPU backend: two multi-threaded passes per step (numba), bounded temporaries.

Launch logic for :mod:`.fused_cpu_kernels`.  Tensors are handed to the kernels as raw
addresses, so a step costs no per-tensor Python work beyond collecting addresses and
one scalar table.  Tensors the kernels cannot take directly are handled explicitly:

* non-contiguous gradients (read only) are copied to contiguous memory;
* non-contiguous tensors that the step writes go through a contiguous temporary that is
  copied back after the step (never a silent copy that the update would land on);
* float16/bfloat16 *moments* (only the operators' float16-without-master form, D6) are
  delegated to the reference backend.

Arithmetic is bit-identical to :mod:`.reference` (same operations, same order, no FMA).
"""
from __future__ import annotations

import functools
import operator
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._validate import HALF_DTYPES
from . import reference
from ._staging import Staging as _Staging
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

try:
    import numpy as np
    import numba

    from . import fused_cpu_kernels as K

    AVAILABLE = True
except ImportError:  # numba is an optional dependency (extra "fast")
    AVAILABLE = False

__all__ = ["AVAILABLE", "supports_device", "phase1_batch", "phase2_batch", "lamb_step", "grad_sum_of_squares",
           "warm_up"]


def supports_device(device: torch.device) -> bool:
    return device.type == "cpu"


if AVAILABLE:
    _MARK = {torch.float32: np.float32(0), torch.float64: np.float64(0),
             torch.bfloat16: np.uint16(0), torch.float16: np.int16(0)}


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _chunks_of(sizes: "np.ndarray"):
    """:func:`_chunks` of an array of sizes (cached on its bytes)."""
    return _chunks(sizes.tobytes())


@functools.lru_cache(maxsize=64)
def _chunks(key: bytes):
    """Chunk table (tensor index, start, length) covering every tensor of the int64 sizes in ``key``."""
    sz = np.frombuffer(key, dtype=np.int64)
    counts = (sz + K.CHUNK - 1) // K.CHUNK
    tensor = np.repeat(np.arange(len(sz), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(tensor.shape[0], dtype=np.int64) - first) * K.CHUNK
    length = np.minimum(K.CHUNK, sz[tensor] - start) if tensor.shape[0] else np.zeros(0, np.int64)
    return tensor, start, length


def _addresses(tensors: Sequence[torch.Tensor], stage: _Staging, written: Sequence[bool] = ()) -> "np.ndarray":
    """Data addresses, non-contiguous tensors staged first (``written[k]``, default True: tensor ``k``
    is written by the step, so its stand-in is copied back)."""
    ptrs = []
    for k, t in enumerate(tensors):
        if not t.is_contiguous():
            t = stage.write(t) if (written[k] if written else True) else stage.read(t)
        ptrs.append(t.data_ptr())
    return np.array(ptrs, dtype=np.int64)


def _owned_addresses(name: tuple, tensors: List[torch.Tensor], stage: _Staging,
                     memo: Optional[dict]) -> Tuple["np.ndarray", "np.ndarray"]:
    """Addresses and sizes of optimizer-owned tensors (moments, masters), remembered in ``memo`` from
    one step to the next while the list holds the very same (contiguous) tensor objects."""
    if memo is not None:
        hit = memo.get(name)
        if hit is not None and len(hit[0]) == len(tensors) and all(map(operator.is_, hit[0], tensors)):
            return hit[1], hit[2]
    staged = len(stage)
    addr = _addresses(tensors, stage)
    sizes = np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))
    if memo is not None and len(stage) == staged:  # staged stand-ins are per step: not remembered
        memo[name] = (list(tensors), addr, sizes)
    return addr, sizes


def _scalar_tables(batch: LambBatch, idx: List[int], cdtype: torch.dtype):
    npdt = np.float64 if cdtype == torch.float64 else np.float32
    override = None if batch.rescale is None else float(batch.rescale)
    scalars = batch.scalars if len(idx) == len(batch.scalars) else [batch.scalars[i] for i in idx]
    if len(set(map(id, scalars))) == 1:  # the usual case: one step count for all (one row, repeated)
        scalars = scalars[:1]
    uniq: Dict[int, int] = {}
    rows_scal, rows_bias, which = [], [], []
    for sc in scalars:
        r = uniq.get(id(sc))
        if r is None:
            r = uniq[id(sc)] = len(rows_scal)
            rows_scal.append((sc.rescale if override is None else override, -1.0 if sc.clip is None else sc.clip,
                              sc.beta1, sc.beta2, sc.one_minus_beta1, sc.one_minus_beta2, sc.epsilon, sc.wd))
            rows_bias.append((0.0, 0.0, 0.0, 0.0) if sc.bias1 is None else
                             (sc.bias1, sc.bias2, 1.0 / sc.bias1, 1.0 / sc.bias2))
        which.append(r)
    sel = np.asarray(which, dtype=np.int64) if len(which) == len(idx) else np.zeros(len(idx), dtype=np.int64)
    scal = np.asarray(rows_scal, dtype=npdt)[sel]
    bias = np.asarray(rows_bias, dtype=np.float64)[sel]
    return scal, bias


def _partition(batch: LambBatch) -> Dict[tuple, List[int]]:
    """Indices of the tensors that share dtypes (one kernel launch each)."""
    if batch.uniform:
        m0 = batch.masters[0]
        key = ((batch.weights[0] if m0 is None else m0).dtype, batch.grads[0].dtype, batch.means[0].dtype,
               m0 is not None, batch.outs[0].dtype)
        return {key: list(range(len(batch.weights)))}
    parts: Dict[tuple, List[int]] = {}
    for i, (w, g, m, master, o) in enumerate(zip(batch.weights, batch.grads, batch.means, batch.masters, batch.outs)):
        key = ((w if master is None else master).dtype, g.dtype, m.dtype, master is not None, o.dtype)
        part = parts.get(key)
        if part is None:
            part = parts[key] = []
        part.append(i)
    return parts


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 of every tensor of ``batch`` and its local squared norms (one parallel pass per dtype;
    ``dry``: nothing written, the gradients' squared norms added as a third row)."""
    if (batch.means[0].dtype in HALF_DTYPES if batch.uniform else any(m.dtype in HALF_DTYPES for m in batch.means)):
        p1 = reference.phase1_batch(batch, dry=dry)
        return Phase1Result(p1.sumsq, ("reference", p1), dry=dry)
    _threads()
    n = len(batch.weights)
    stage = _Staging()
    plans = []
    sumsq = np.zeros((3 if dry else 2, n), dtype=np.float64)
    noted = batch.memo.pop("grad_addresses", None) if batch.memo is not None else None  # this step's, or stale
    for (src_dtype, g_dtype, m_dtype, has_master, o_dtype), idx in _partition(batch).items():
        # the decay source is written with a master, or when the output is the weight itself (in place)
        inplace = [not has_master and batch.outs[i] is batch.weights[i] for i in idx]
        part = (src_dtype, g_dtype, m_dtype, has_master, o_dtype)
        everything = len(idx) == n
        means = batch.means if everything else [batch.means[i] for i in idx]
        m_addr, sz = _owned_addresses(("mean",) + part, means, stage, batch.memo)
        v_addr, _ = _owned_addresses(("var",) + part, batch.vars if everything else [batch.vars[i] for i in idx],
                                     stage, batch.memo)
        if has_master:
            w_addr, _ = _owned_addresses(("master",) + part, [batch.masters[i] for i in idx], stage, batch.memo)
        else:
            w_addr = _addresses([batch.weights[i] for i in idx], stage, inplace)
        outs = [batch.outs[i] for i in idx]
        o_addr = w_addr if all(inplace) else np.where(inplace, w_addr, _addresses(outs, stage))
        if everything and noted is not None and noted[0] is batch.grads:  # from this step's gradient pass
            g_addr = noted[1]
        else:
            g_addr = _addresses(batch.grads if everything else [batch.grads[i] for i in idx], stage,
                                [False] * len(idx))
        ct, cs, cl = _chunks_of(sz)
        cdtype = torch.float64 if m_dtype == torch.float64 else torch.float32
        scal, bias = _scalar_tables(batch, idx, cdtype)
        partial = np.empty((ct.shape[0], 3), dtype=np.float64)
        scratch = np.empty((numba.config.NUMBA_NUM_THREADS, K.CHUNK), dtype=scal.dtype)  # one chunk per thread
        K.phase1_pass(w_addr, g_addr, m_addr, v_addr, sz, _MARK[src_dtype], _MARK[g_dtype],
                      _MARK[m_dtype], scal, bias, ct, cs, cl, partial, scratch, not dry)
        sumsq[:, idx] = K.sum_chunks(partial, ct, len(idx))[:sumsq.shape[0]]
        plans.append((idx, w_addr, g_addr, m_addr, v_addr, o_addr, sz, src_dtype, g_dtype, m_dtype, o_dtype,
                      has_master, scal, bias, ct, cs, cl))
    return Phase1Result(sumsq=torch.from_numpy(sumsq), carry=(plans, stage), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 of every tensor of ``batch`` (one parallel pass per dtype), then staged tensors copied back."""
    if isinstance(p1.carry, tuple) and p1.carry[0] == "reference":
        return reference.phase2_batch(batch, p1.carry[1], steps)
    plans, stage = p1.carry
    steps_np = steps.cpu().numpy()
    for (idx, w_addr, g_addr, m_addr, v_addr, o_addr, sz, src_dtype, g_dtype, m_dtype, o_dtype, has_master,
         scal, bias, ct, cs, cl) in plans:
        steps_i = np.ascontiguousarray(steps_np[idx])
        marks = (_MARK[src_dtype], _MARK[g_dtype], _MARK[m_dtype])
        if has_master:
            K.phase2_master_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sz, *marks, _MARK[o_dtype], scal, bias,
                                 steps_i, ct, cs, cl, p1.dry)
        elif np.array_equal(w_addr, o_addr) and src_dtype == o_dtype:
            K.phase2_inplace_pass(w_addr, g_addr, m_addr, v_addr, sz, *marks, scal, bias, steps_i, ct, cs, cl,
                                  p1.dry)
        else:
            K.phase2_out_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sz, *marks, _MARK[o_dtype], scal, bias,
                              steps_i, ct, cs, cl, p1.dry)
    stage.finish()
    return None


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
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        gs = [grads[i] for i in idx]
        sizes = np.fromiter((g.numel() for g in gs), dtype=np.int64, count=len(gs))
        ct, cs, cl = _chunks_of(sizes)
        partial = np.empty((ct.shape[0], 1), dtype=np.float64)
        addr = _addresses(gs, stage, [False] * len(gs))
        if memo is not None and len(idx) == n and not len(stage):  # one dtype, nothing staged: reusable
            memo["grad_addresses"] = (grads, addr)
        K.grad_sumsq_pass(addr, sizes, _MARK[dtype], ct, cs, cl, partial)
        out[idx] = K.sum_chunks(partial, ct, len(idx))[0]
    return torch.from_numpy(out)


def warm_up(dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)) -> None:
    """Compile (or load from numba's on-disk cache) the kernels for the usual dtype combinations."""
    from .._scalars import phase1_scalars

    for dt in dtypes:
        master = dt in HALF_DTYPES
        w = torch.zeros(3, dtype=dt)
        src = w.float() if master else w
        mdt = torch.float64 if dt == torch.float64 else torch.float32
        sc = phase1_scalars(t=1, wd=0.0, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                            rescale_grad=1.0, clip_gradient=-1.0, dtype=mdt)
        batch = LambBatch(weights=[w], grads=[torch.zeros(3, dtype=dt)], means=[torch.zeros(3, dtype=mdt)],
                          vars=[torch.zeros(3, dtype=mdt)], masters=[src if master else None], outs=[w],
                          scalars=[sc], lrs=[0.0])
        lamb_step(batch)
        grad_sum_of_squares([w])
