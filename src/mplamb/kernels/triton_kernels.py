"""Triton kernels of the GPU backend (the launch logic is in :mod:`.triton_gpu`).

Multi-tensor: one launch covers every tensor of a partition (tensors sharing dtypes).  A
program handles one fixed-size block of one tensor; ``tid[pid]`` names the tensor and
``first[t]`` its first block (the chunk table of :mod:`._plan`), so the block's offset is
``(pid - first[t]) * BLOCK``.  Each tensor's data addresses and hyper-parameters come from a
per-step table uploaded once (int64 view ``addr`` and float64 view ``num`` of one buffer):

* ``addr[6 * t + c]``: the addresses of (decay source ``w``, grad, mean, var, out, step count);
* ``num[scal_at + 8 * t + c]``: (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd),
  float32 values held exactly (clip = -1: off);
* ``num[bias_at + 4 * t + c]``: (bias1, bias2, 1/bias1, 1/bias2) (bias1 = 0: no correction),
  so float64 values such as ``1 - beta1**t`` arrive exactly and a changing step count never
  recompiles.

A capturable step (``DEVICE_T``) reads the bias corrections from row ``min(count + 1, last)`` of a
device table (``bias_ptr``, :func:`mplamb._scalars.bias_table`) instead, ``count`` being the
tensor's step count in device memory (its address in column 5), and every store is masked by a
device skip flag (``skip_ptr``): nothing on the host changes from step to step.
:func:`advance_steps_kernel` then adds one to every count unless the step is skipped.

Per-block float64 partial sums are reduced per tensor by :func:`sum_blocks_kernel`, each
tensor's blocks in order: deterministic, no atomics.

The reference's arithmetic, operation for operation, in float32: IEEE division and square
root (``tl.div_rn``, ``tl.sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate on
NVIDIA GPUs), MXNet's float64 division for the bias-corrected mean, and the launcher turns
FMA contraction off.  bfloat16 tensors arrive as int16 bit patterns and are widened and
rounded (to nearest even) with integer arithmetic, which also works under
``TRITON_INTERPRET=1`` (numpy has no bfloat16), so these kernels are tested on CPU.

The bias corrections divide without a divider, bit for bit as the fused CPU backend does
(see ``fused_cpu_kernels.divide_in_float64`` and ``divide_by_constant`` for the arguments):
MXNet's float64 ``mean / bias1`` by Markstein's FMA-corrected reciprocal, the float32
``var / bias2`` as a float64 product with the reciprocal.
"""
from __future__ import annotations

import triton
import triton.language as tl

F32, BF16, F16 = 0, 1, 2  # storage kinds
ADDR_COLS, SCAL_COLS, BIAS_COLS = 6, 8, 4  # per-tensor table widths


@triton.jit
def _pointer(addr_ptr, KIND: tl.constexpr):
    """The address stored at ``addr_ptr`` as a pointer to elements of storage ``KIND``."""
    a = tl.load(addr_ptr)
    if KIND == 1:
        return a.to(tl.pointer_type(tl.int16))
    elif KIND == 2:
        return a.to(tl.pointer_type(tl.float16))
    else:
        return a.to(tl.pointer_type(tl.float32))


@triton.jit
def _load(ptr, offs, mask, KIND: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0)
    if KIND == 1:
        return ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _bf16_bits(value):
    """The bfloat16 bit pattern (low 16 bits of a uint32) of float32 ``value`` rounded to nearest even
    (NaN: the canonical quiet NaN 0x7FC0, as torch)."""
    u = value.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)


@triton.jit
def _round(value, KIND: tl.constexpr):
    """float32 ``value`` rounded to storage ``KIND`` and widened back: the float32 value that
    :func:`_store` of ``value`` leaves in memory."""
    if KIND == 1:
        return (_bf16_bits(value) << 16).to(tl.float32, bitcast=True)
    elif KIND == 2:
        return value.to(tl.float16).to(tl.float32)
    else:
        return value


@triton.jit
def _store(ptr, offs, mask, value, KIND: tl.constexpr):
    if KIND == 1:
        tl.store(ptr + offs, _bf16_bits(value).to(tl.int32).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def divide_in_float64(x, d, inv):
    """float32 ``RN32(RN64(x / d))`` for float64 ``d`` and ``inv = RN64(1/d)``: Markstein's correction."""
    x64 = x.to(tl.float64)
    q = x64 * inv
    q = tl.fma(tl.fma(-q, d, x64), inv, q)
    return (q.to(tl.float32).to(tl.uint32, bitcast=True)
            | (x.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)  # -0 stays -0


@triton.jit
def divide_by_constant(x, inv):
    """float32 ``x / d`` correctly rounded, for a float32 constant ``d`` and ``inv = RN64(1/d)``."""
    return (x.to(tl.float64) * inv).to(tl.float32)


@triton.jit
def _block(pid, tid_ptr, first_ptr, size_ptr, BLOCK: tl.constexpr):
    """(tensor, offsets, mask) of program ``pid``."""
    t = tl.load(tid_ptr + pid)
    start = (pid - tl.load(first_ptr + t)).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(size_ptr + t)


@triton.jit
def _bias_row(addr_ptr, num_ptr, bias_at, bias_ptr, last_row, t, DEVICE_T: tl.constexpr):
    """Pointer to tensor ``t``'s (bias1, bias2, 1/bias1, 1/bias2): its row of the step's table, or
    (``DEVICE_T``) row ``min(count + 1, last_row)`` of the device bias table."""
    if DEVICE_T:
        count = tl.load(_pointer(addr_ptr + 6 * t + 5, 0))
        return bias_ptr + 4 * tl.minimum(count.to(tl.int64) + 1, last_row)
    else:
        return num_ptr + bias_at + 4 * t


@triton.jit
def _keep(skip_ptr, offs, mask, SKIP_FROM_PTR: tl.constexpr):
    """``mask`` for the stores: cleared when the device skip flag is set."""
    if SKIP_FROM_PTR:
        return mask & ((offs * 0 + tl.load(skip_ptr).to(offs.dtype)) == 0)
    else:
        return mask


@triton.jit
def _direction(m, v, w, num_ptr, scal_at, bias_row, t):
    """``mean_hat / (sqrt(var_hat) + eps) + wd * w`` of a block (bias1 = 0: no bias correction)."""
    eps = tl.load(num_ptr + scal_at + 8 * t + 6).to(tl.float32)
    wd = tl.load(num_ptr + scal_at + 8 * t + 7).to(tl.float32)
    bias1 = tl.load(bias_row)
    if bias1 != 0.0:
        m = divide_in_float64(m, bias1, tl.load(bias_row + 2))
        v = divide_by_constant(v, tl.load(bias_row + 3))
    return tl.div_rn(m, tl.sqrt_rn(v) + eps) + w * wd


@triton.jit
def _new_moments(grad, m0, v0, row, rescale_ptr, RESCALE_FROM_PTR: tl.constexpr):
    """The new (mean, var) from the widened gradient and the old moments (float32), with the
    scalar row ``row`` = (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, ...)."""
    if RESCALE_FROM_PTR:
        rescale = tl.load(rescale_ptr).to(tl.float32)
    else:
        rescale = tl.load(row).to(tl.float32)
    clip = tl.load(row + 1).to(tl.float32)
    b1 = tl.load(row + 2).to(tl.float32)
    b2 = tl.load(row + 3).to(tl.float32)
    omb1 = tl.load(row + 4).to(tl.float32)
    omb2 = tl.load(row + 5).to(tl.float32)
    s = grad * rescale
    if clip > 0:
        s = tl.where(s > clip, clip, s)
        s = tl.where(s < -clip, -clip, s)
    m = m0 * b1 + s * omb1
    v = v0 * b2 + (s * omb2) * s
    return m, v


@triton.jit
def _moments(g_ptr, m_ptr, v_ptr, num_ptr, scal_at, t, rescale_ptr, offs, mask, G_KIND: tl.constexpr,
             RESCALE_FROM_PTR: tl.constexpr):
    """The new (mean, var) of a block from its raw gradient."""
    return _new_moments(_load(g_ptr, offs, mask, G_KIND), tl.load(m_ptr + offs, mask=mask, other=0.0),
                        tl.load(v_ptr + offs, mask=mask, other=0.0), num_ptr + scal_at + 8 * t, rescale_ptr,
                        RESCALE_FROM_PTR)


@triton.jit
def phase1_kernel(addr_ptr, num_ptr, scal_at, bias_at, tid_ptr, first_ptr, size_ptr, rescale_ptr, partial_ptr,
                  bias_ptr, last_row, skip_ptr,
                  W_KIND: tl.constexpr, G_KIND: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr,
                  WRITE: tl.constexpr, DEVICE_T: tl.constexpr, SKIP_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: new moments (stored when WRITE), partial sums of w**2, g**2 and (not WRITE) grad**2."""
    pid = tl.program_id(0)
    t, offs, mask = _block(pid, tid_ptr, first_ptr, size_ptr, BLOCK)
    w_ptr = _pointer(addr_ptr + 6 * t, W_KIND)
    g_ptr = _pointer(addr_ptr + 6 * t + 1, G_KIND)
    m_ptr = _pointer(addr_ptr + 6 * t + 2, 0)
    v_ptr = _pointer(addr_ptr + 6 * t + 3, 0)
    m, v = _moments(g_ptr, m_ptr, v_ptr, num_ptr, scal_at, t, rescale_ptr, offs, mask, G_KIND, RESCALE_FROM_PTR)
    if WRITE:
        keep = _keep(skip_ptr, offs, mask, SKIP_FROM_PTR)
        tl.store(m_ptr + offs, m, mask=keep)
        tl.store(v_ptr + offs, v, mask=keep)
        tl.store(partial_ptr + 3 * pid + 2, 0.0)
    else:
        raw = tl.where(mask, _load(g_ptr, offs, mask, G_KIND), 0.0).to(tl.float64)
        tl.store(partial_ptr + 3 * pid + 2, tl.sum(raw * raw, axis=0))
    w = _load(w_ptr, offs, mask, W_KIND)
    bias_row = _bias_row(addr_ptr, num_ptr, bias_at, bias_ptr, last_row, t, DEVICE_T)
    d = tl.where(mask, _direction(m, v, w, num_ptr, scal_at, bias_row, t), 0.0).to(tl.float64)
    w64 = tl.where(mask, w, 0.0).to(tl.float64)
    tl.store(partial_ptr + 3 * pid, tl.sum(w64 * w64, axis=0))
    tl.store(partial_ptr + 3 * pid + 1, tl.sum(d * d, axis=0))


@triton.jit
def phase2_kernel(addr_ptr, num_ptr, scal_at, bias_at, tid_ptr, first_ptr, size_ptr, rescale_ptr, steps_ptr,
                  bias_ptr, last_row, skip_ptr,
                  W_KIND: tl.constexpr, G_KIND: tl.constexpr, O_KIND: tl.constexpr, WRITE_W: tl.constexpr,
                  RESCALE_FROM_PTR: tl.constexpr, RECOMPUTE: tl.constexpr, DEVICE_T: tl.constexpr,
                  SKIP_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: ``out = w - step * g`` (and ``w`` too when WRITE_W: a master), from the stored
    moments, or (RECOMPUTE) from moments recomputed from the gradient and stored."""
    pid = tl.program_id(0)
    t, offs, mask = _block(pid, tid_ptr, first_ptr, size_ptr, BLOCK)
    keep = _keep(skip_ptr, offs, mask, SKIP_FROM_PTR)
    w_ptr = _pointer(addr_ptr + 6 * t, W_KIND)
    m_ptr = _pointer(addr_ptr + 6 * t + 2, 0)
    v_ptr = _pointer(addr_ptr + 6 * t + 3, 0)
    out_ptr = _pointer(addr_ptr + 6 * t + 4, O_KIND)
    step = tl.load(steps_ptr + t).to(tl.float32)
    w = _load(w_ptr, offs, mask, W_KIND)
    if RECOMPUTE:
        g_ptr = _pointer(addr_ptr + 6 * t + 1, G_KIND)
        m, v = _moments(g_ptr, m_ptr, v_ptr, num_ptr, scal_at, t, rescale_ptr, offs, mask, G_KIND,
                        RESCALE_FROM_PTR)
        tl.store(m_ptr + offs, m, mask=keep)
        tl.store(v_ptr + offs, v, mask=keep)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    bias_row = _bias_row(addr_ptr, num_ptr, bias_at, bias_ptr, last_row, t, DEVICE_T)
    new = w - step * _direction(m, v, w, num_ptr, scal_at, bias_row, t)
    if WRITE_W:
        _store(w_ptr, offs, keep, new, W_KIND)
    _store(out_ptr, offs, keep, new, O_KIND)


@triton.jit
def advance_steps_kernel(addr_ptr, skip_ptr, n, BLOCK: tl.constexpr, STRIDE: tl.constexpr, COL: tl.constexpr):
    """Every tensor's step count plus one, unless the skip flag is set (the count's address is column
    ``COL`` of rows of ``STRIDE`` in the table: 5 of :data:`ADDR_COLS` here, another place in the lean
    step's table)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    counts = tl.load(addr_ptr + STRIDE * i + COL, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    add = (tl.load(skip_ptr) == 0).to(tl.float32)
    tl.store(counts, tl.load(counts, mask=mask) + add, mask=mask)


@triton.jit
def grad_sumsq_kernel(addr_ptr, tid_ptr, first_ptr, size_ptr, partial_ptr, G_KIND: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per block: the float64 sum of squares of a raw gradient (``addr[t]``: its address)."""
    pid = tl.program_id(0)
    t, offs, mask = _block(pid, tid_ptr, first_ptr, size_ptr, BLOCK)
    g = _load(_pointer(addr_ptr + t, G_KIND), offs, mask, G_KIND).to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))


@triton.jit
def sum_blocks_kernel(partial_ptr, first_ptr, out_ptr, n, COLS: tl.constexpr, ROWS: tl.constexpr,
                      RBLOCK: tl.constexpr):
    """``out[r, t]`` = sum of column ``r`` of tensor ``t``'s block partials (``partial`` is
    ``(blocks, COLS)``; rows ``r < ROWS``), always in the same order: deterministic."""
    t = tl.program_id(0)
    lo = tl.load(first_ptr + t)
    hi = tl.load(first_ptr + t + 1)
    for r in tl.static_range(ROWS):
        acc = tl.zeros([RBLOCK], dtype=tl.float64)
        for b in range(lo, hi, RBLOCK):
            idx = b + tl.arange(0, RBLOCK)
            acc += tl.load(partial_ptr + idx * COLS + r, mask=idx < hi, other=0.0)
        tl.store(out_ptr + r * n + t, tl.sum(acc, axis=0))
