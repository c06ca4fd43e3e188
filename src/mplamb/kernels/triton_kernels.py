"""Triton kernels of the GPU backend (the launch logic is in :mod:`.triton_gpu`).

The reference's arithmetic, operation for operation, in float32: IEEE division and square
root (``tl.div_rn``, ``tl.sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate on
NVIDIA GPUs), MXNet's float64 division for the bias-corrected mean, and the launcher turns
FMA contraction off.  bfloat16 tensors arrive as int16 bit patterns and are widened and
rounded (to nearest even) with integer arithmetic, which also works under
``TRITON_INTERPRET=1`` (numpy has no bfloat16), so these kernels are tested on CPU.

Scalars are read from a float64 table on the device (so float64 values such as
``1 - beta1**t`` arrive exactly and a changing step count never recompiles):
row = (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd, bias1, bias2, 1/bias1, 1/bias2).

The bias corrections divide without a divider, bit for bit as the fused CPU backend does
(see ``fused_cpu_kernels.divide_in_float64`` and ``divide_by_constant`` for the arguments):
MXNet's float64 ``mean / bias1`` by Markstein's FMA-corrected reciprocal, the float32
``var / bias2`` as a float64 product with the reciprocal.
"""
from __future__ import annotations

import triton
import triton.language as tl

NSCAL = 12
F32, BF16, F16 = 0, 1, 2  # storage kinds


@triton.jit
def _load(ptr, offs, mask, KIND: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0)
    if KIND == 1:
        return ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, mask, value, KIND: tl.constexpr):
    if KIND == 1:
        u = value.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        tl.store(ptr + offs, bits.to(tl.int32).to(tl.int16), mask=mask)
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
def _direction(m, v, w, eps, wd, bias1, inv1, inv2, BIAS: tl.constexpr):
    if BIAS:
        m = divide_in_float64(m, bias1, inv1)
        v = divide_by_constant(v, inv2)
    return tl.div_rn(m, tl.sqrt_rn(v) + eps) + w * wd


@triton.jit
def _direction_scalars(scal_ptr):
    """(eps, wd, bias1, 1/bias1, 1/bias2) of a scalar-table row (the last three float64)."""
    return (tl.load(scal_ptr + 6).to(tl.float32), tl.load(scal_ptr + 7).to(tl.float32), tl.load(scal_ptr + 8),
            tl.load(scal_ptr + 10), tl.load(scal_ptr + 11))


@triton.jit
def _moments(g_ptr, m_ptr, v_ptr, scal_ptr, rescale_ptr, offs, mask, G_KIND: tl.constexpr,
             HAS_CLIP: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr):
    """The new (mean, var) of a block from its raw gradient."""
    if RESCALE_FROM_PTR:
        rescale = tl.load(rescale_ptr).to(tl.float32)
    else:
        rescale = tl.load(scal_ptr + 0).to(tl.float32)
    clip = tl.load(scal_ptr + 1).to(tl.float32)
    b1 = tl.load(scal_ptr + 2).to(tl.float32)
    b2 = tl.load(scal_ptr + 3).to(tl.float32)
    omb1 = tl.load(scal_ptr + 4).to(tl.float32)
    omb2 = tl.load(scal_ptr + 5).to(tl.float32)
    s = _load(g_ptr, offs, mask, G_KIND) * rescale
    if HAS_CLIP:
        s = tl.where(s > clip, clip, s)
        s = tl.where(s < -clip, -clip, s)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0) * b1 + s * omb1
    v = tl.load(v_ptr + offs, mask=mask, other=0.0) * b2 + (s * omb2) * s
    return m, v


@triton.jit
def phase1_kernel(w_ptr, g_ptr, m_ptr, v_ptr, scal_ptr, rescale_ptr, partial_ptr, n,
                  W_KIND: tl.constexpr, G_KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BIAS: tl.constexpr,
                  RESCALE_FROM_PTR: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: new moments (stored when WRITE), partial sums of w**2, g**2 and (not WRITE) grad**2."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    eps, wd, bias1, inv1, inv2 = _direction_scalars(scal_ptr)
    m, v = _moments(g_ptr, m_ptr, v_ptr, scal_ptr, rescale_ptr, offs, mask, G_KIND, HAS_CLIP, RESCALE_FROM_PTR)
    if WRITE:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(partial_ptr + 3 * pid + 2, 0.0)
    else:
        raw = tl.where(mask, _load(g_ptr, offs, mask, G_KIND), 0.0).to(tl.float64)
        tl.store(partial_ptr + 3 * pid + 2, tl.sum(raw * raw, axis=0))
    w = _load(w_ptr, offs, mask, W_KIND)
    d = tl.where(mask, _direction(m, v, w, eps, wd, bias1, inv1, inv2, BIAS), 0.0).to(tl.float64)
    w64 = tl.where(mask, w, 0.0).to(tl.float64)
    tl.store(partial_ptr + 3 * pid, tl.sum(w64 * w64, axis=0))
    tl.store(partial_ptr + 3 * pid + 1, tl.sum(d * d, axis=0))


@triton.jit
def phase2_kernel(w_ptr, g_ptr, m_ptr, v_ptr, out_ptr, scal_ptr, rescale_ptr, steps_ptr, n,
                  W_KIND: tl.constexpr, G_KIND: tl.constexpr, O_KIND: tl.constexpr, WRITE_W: tl.constexpr,
                  BIAS: tl.constexpr, HAS_CLIP: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr,
                  RECOMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: ``w - step * g``, from the stored moments, or (RECOMPUTE) from moments recomputed
    from the gradient and stored."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    eps, wd, bias1, inv1, inv2 = _direction_scalars(scal_ptr)
    step = tl.load(steps_ptr).to(tl.float32)
    w = _load(w_ptr, offs, mask, W_KIND)
    if RECOMPUTE:
        m, v = _moments(g_ptr, m_ptr, v_ptr, scal_ptr, rescale_ptr, offs, mask, G_KIND, HAS_CLIP,
                           RESCALE_FROM_PTR)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    new = w - step * _direction(m, v, w, eps, wd, bias1, inv1, inv2, BIAS)
    if WRITE_W:
        _store(w_ptr, offs, mask, new, W_KIND)
    _store(out_ptr, offs, mask, new, O_KIND)
