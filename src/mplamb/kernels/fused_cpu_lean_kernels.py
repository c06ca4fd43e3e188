"""numba kernels of the fused CPU backend's *lean* step (the launch logic is in :mod:`.fused_cpu`).

The lean step (:func:`mplamb.kernels.reference.lean_update`) keeps the moments in a storage format
of :mod:`.codec` and/or the weights Kahan-compensated.  Its kernels perform the reference's
arithmetic element for element, in the same order, without FMA contraction, so every code,
scale, weight, compensation and master is bit-identical to the reference's; the specification of
the formats (blocks, companding, dither, packing) is the docstring of :mod:`.codec` and is not
repeated here.  Per element of tensor ``i`` (compute dtype float32)::

    w        = float32(p) + float32(c)   (Kahan)  |  master  |  float32(p)       effective weight
    m0, v0   = decode(old codes, old scales)                                     (codec)
    s        = clip(float32(grad) * rescale)
    m        = m0 * beta1 + s * (1 - beta1);    v = v0 * beta2 + (s * (1 - beta2)) * s
    a, b     = max |m|, max v over the block (NaN propagates, as torch.amax)     blocked formats
    qm, qv   = encode(m, 1/a), encode(v, 1/b, dither(j, t))                      (codec)
    g        = direction(decode(qm, a), decode(qv, b), w)                        (the update the codes give)
    phase 2:   new = w - step * g;  p = RN(new), c = RN(new - float32(p)) | master = new, out = RN(new) | out = RN(new)

and per work item the float64 partial sums of ``w**2`` and ``g**2`` (and of ``grad**2`` in a dry
phase 1).  ``direction`` is the reference's (:func:`.fused_cpu_kernels._direction`: the mean's bias
correction a float64 division rounded to float32, the variance's a float32 division), with the
bias-correction regime read at run time (one compiled loop serves every step count).

Work items (``prange``) are element ranges of one tensor: for the element-wise formats ``"fp32"``
and ``"bf16"`` chunks of :data:`CHUNK` elements, for the blocked formats ``"8bit"``/``"4bit"``
runs of whole blocks (:func:`mplamb.kernels._plan.block_table`), which a kernel walks block by
block (a block: ``min(B, L - col)`` elements from column ``col`` of a row of ``L``).

Every kernel takes the weights, compensations and masters of a launch as three address arrays and
a run-time ``wmode`` (:data:`PLAIN`, :data:`MASTER`, :data:`KAHAN`; an array the mode has no use for
gets the weights' addresses and is never read), so the compiled loops depend only on the weight,
gradient and code dtypes: fewer compilations, the same arithmetic.

Two passes, like the other fused kernels: phase 1 writes the new codes and scales (unless dry)
and sums squares; phase 2 recomputes ``g`` from the stored new codes and writes the weights —
or, after a dry phase 1, recomputes everything from the old codes and writes codes, scales and
weights.  Codes arrive as ``int8``/``uint8`` arrays (4-bit: the packed bytes), bfloat16 moments
and weights as ``uint16`` bit patterns, float16 weights as ``int16`` (see :mod:`.fused_cpu_kernels`).
Non-finite moments give codes the reference leaves implementation-defined (a NaN cast to an
integer); the optimizer never stores them (it skips non-finite steps).
"""
from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange, types
from numba.extending import overload

from .fused_cpu_kernels import (CHUNK, cast_like, divide_by_constant, divide_in_float64, load, store,
                                sum_of_squares, sums_of_squares, view, _moments)

__all__ = ["CHUNK", "PLAIN", "MASTER", "KAHAN", "phase1_elementwise_pass", "phase2_elementwise_pass",
           "phase1_blocked_pass", "phase2_blocked_pass"]

# how phase 2 writes the new weight ``new`` (a launch-wide, run-time mode)
PLAIN = 0  # out = RN(new)            (the weight, or a separate output)
MASTER = 1  # master = new; out = RN(new)
KAHAN = 2  # out = p = RN(new); comp = RN(new - float32(p))

_M32 = np.uint64(0xFFFFFFFF)
_MUL0 = np.uint64(0x7FEB352D)
_MUL1 = np.uint64(0x846CA68B)
_S8, _S15, _S16 = np.uint64(8), np.uint64(15), np.uint64(16)
_TWO_M24 = np.float32(2.0 ** -24)


# ------------------------------------------------------------------ element helpers

@njit(inline="always")
def dither(j, golden_seed):
    """:func:`mplamb.kernels.codec.dither` of element ``j``: ``golden_seed`` is the host's
    ``((t mod 2**31) * 0x9E3779B9 + offset) mod 2**32`` for the step ``t`` and the tensor's dither offset (all arithmetic in uint64, masked
    to 32 bits after every addition and multiplication)."""
    x = (np.uint64(j) + np.uint64(golden_seed)) & _M32
    x = x ^ (x >> _S16)
    x = (x * _MUL0) & _M32
    x = x ^ (x >> _S15)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> _S16)
    return np.float32(x >> _S8) * _TWO_M24


@njit(inline="always")
def decode_mean(q, a, inv_n):
    """``(t * |t|) * a`` with ``t = q * RN(1/N)`` (``q`` an integer code)."""
    t = np.float32(q) * inv_n
    return (t * np.abs(t)) * a


@njit(inline="always")
def decode_var(q, b, inv_k):
    """``((t * t) * (t * t)) * b`` with ``t = (q + 1) * (1/K)``."""
    t = (np.float32(q) + np.float32(1.0)) * inv_k
    t2 = t * t
    return (t2 * t2) * b


@njit(inline="always")
def encode_mean(x, ra, n_levels):
    """``sign(x) * min(floor(sqrt(|x| * ra) * N + 1/2), N)`` as an int32 (``ra``: the block's ``1/a``)."""
    k = np.floor(np.sqrt(np.abs(x) * ra) * n_levels + np.float32(0.5))
    k = n_levels if k > n_levels else k
    return np.int32(-k) if x < 0 else np.int32(k)


@njit(inline="always")
def encode_var(x, rb, k_levels, d):
    """``clamp(floor(sqrt(sqrt(x * rb)) * K + d) - 1, 0, K - 1)`` as an int32 (``d``: the dither)."""
    k = np.floor(np.sqrt(np.sqrt(x * rb)) * k_levels + d) - np.float32(1.0)
    top = k_levels - np.float32(1.0)
    k = np.float32(0.0) if k < 0 else k
    k = top if k > top else k
    return np.int32(k)


@njit(cache=True)
def rounded(x, mark):
    """``x`` stored as ``mark``'s type (an element-wise format's code: float32, or bfloat16 bits rounded to
    nearest even).  A function of its own rather than inlined into the loops: numba's IR inliner
    mishandles several inlined copies of the bfloat16 store in one loop body (LLVM inlines it instead)."""
    return store(x, mark)


@njit(inline="always")
def reciprocal(a):
    """``1/a`` in float32, 0 where ``a`` is not positive (codec's ``_reciprocal``)."""
    return np.float32(1.0) / a if a > 0 else np.float32(0.0)


@njit(inline="always")
def direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var):
    """:func:`.fused_cpu_kernels._direction` with the bias-correction regime as run-time flags."""
    if div_mean:
        m = divide_in_float64(m, bias1, inv1)
    if div_var:
        v = divide_by_constant(v, bias2, inv2)
    return m / (np.sqrt(v) + eps) + w * wd


def packed(fmark):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(packed, inline="always")
def _packed(fmark):
    """Whether the format marker says 4-bit (``uint8``: two codes a byte) rather than 8-bit (``int8``)."""
    flag = fmark == types.uint8
    return lambda fmark: flag


@njit(inline="always")
def mean_code(codes, base, j, fmark):
    """The signed first-moment code of element ``j`` of a block whose codes start at ``base``
    (8-bit: element ``base + j``; 4-bit: nibble ``j & 1`` of byte ``base + j // 2``)."""
    if packed(fmark):
        x = (np.int32(codes[base + (j >> 1)]) >> np.int32(4 * (j & 1))) & np.int32(15)
        return (x ^ np.int32(8)) - np.int32(8)
    return np.int32(codes[base + j])


@njit(inline="always")
def var_code(codes, base, j, fmark):
    """The unsigned second-moment code of element ``j`` of a block (see :func:`mean_code`)."""
    if packed(fmark):
        return (np.int32(codes[base + (j >> 1)]) >> np.int32(4 * (j & 1))) & np.int32(15)
    return np.int32(codes[base + j])


@njit(inline="always")
def put_codes(codes, base, q, n, fmark):
    """Store the block's ``n`` codes ``q`` (4-bit: two a byte, the even one low; a lone last one with a
    zero high nibble, as the reference pads)."""
    if packed(fmark):
        for jj in range(0, n - 1, 2):
            codes[base + (jj >> 1)] = (q[jj] & np.int32(15)) | ((q[jj + 1] & np.int32(15)) << np.int32(4))
        if n & 1:
            codes[base + ((n - 1) >> 1)] = q[n - 1] & np.int32(15)
    else:
        for j in range(n):
            codes[base + j] = q[j]


@njit(inline="always")
def effective_weights(w, c, mst, e, n, out, wmode):
    """``out[:n]`` = the effective weights of elements ``e .. e+n-1`` (``wmode``): ``float32(p) +
    float32(c)`` with a compensation, the master, or the weight widened."""
    if wmode == KAHAN:
        for j in range(n):
            out[j] = load(w[e + j]) + load(c[e + j])
    elif wmode == MASTER:
        for j in range(n):
            out[j] = mst[e + j]
    else:
        for j in range(n):
            out[j] = load(w[e + j])


@njit(cache=True, error_model="numpy")
def write_weights(wb, gb, step, mst, c, o, e, n, wmode, w_mark):
    """Phase 2's writes for elements ``e .. e+n-1``: ``new = wb - step * gb`` stored as ``wmode`` says."""
    if wmode == KAHAN:
        for j in range(n):
            new = wb[j] - step * gb[j]
            p = rounded(new, w_mark)
            o[e + j] = p
            c[e + j] = rounded(new - load(p), w_mark)
    elif wmode == MASTER:
        for j in range(n):
            new = wb[j] - step * gb[j]
            mst[e + j] = new
            o[e + j] = rounded(new, w_mark)
    else:
        for j in range(n):
            o[e + j] = rounded(wb[j] - step * gb[j], w_mark)


# ------------------------------------------------------------------ element-wise formats ("fp32", "bf16")

@njit(parallel=True, cache=True, error_model="numpy")
def phase1_elementwise_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal,
                            bias, flags, chunk_tensor, chunk_start, chunk_len, partial, scratch, wmode, write):
    """Phase 1 of the ``"fp32"``/``"bf16"`` formats (moments float32 or bfloat16 bits: ``m_mark``) and
    the per-chunk partial sums ``partial[k]`` = (w**2, g**2, grad**2 (dry only)).  ``scal[i]`` =
    (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd) float32 (clip +inf: off), ``bias[i]`` =
    (bias1, bias2, 1/bias1, 1/bias2) float64, ``flags`` = (divide the mean, divide the var).  The new
    moments are rounded to the format and written when ``write``; ``g`` uses the rounded values."""
    div_mean, div_var = flags[0], flags[1]
    for k in prange(chunk_tensor.shape[0]):
        i, s0, n = chunk_tensor[k], chunk_start[k], chunk_len[k]
        size = sizes[i]
        w, c = view(w_addr[i], size, w_mark), view(c_addr[i], size, w_mark)
        mst = view(mst_addr[i], size, np.float32(0))
        g = view(g_addr[i], size, g_mark)
        mean, var = view(m_addr[i], size, m_mark), view(v_addr[i], size, m_mark)
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        tid = get_thread_id()
        wb, gb = scratch[tid, 0, :n], scratch[tid, 1, :n]
        effective_weights(w, c, mst, s0, n, wb, wmode)
        for j in range(n):
            m, v = _moments(g[s0 + j], load(mean[s0 + j]), load(var[s0 + j]), rescale, clip, b1, b2, omb1, omb2)
            mq, vq = rounded(m, m_mark), rounded(v, m_mark)
            if write:
                mean[s0 + j] = mq
                var[s0 + j] = vq
            gb[j] = direction(load(mq), load(vq), wb[j], eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var)
        partial[k, 0], partial[k, 1] = sums_of_squares(wb, gb)
        partial[k, 2] = 0.0 if write else sum_of_squares(g[s0:s0 + n])


@njit(parallel=True, cache=True, error_model="numpy")
def phase2_elementwise_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, o_addr, sizes, w_mark, g_mark, m_mark,
                            scal, bias, flags, steps, chunk_tensor, chunk_start, chunk_len, scratch, wmode,
                            recompute):
    """Phase 2 of the ``"fp32"``/``"bf16"`` formats: ``g`` from the stored moments (``recompute``: from
    the old ones, as phase 1 does, and the new ones written), then the weights (``wmode``)."""
    div_mean, div_var = flags[0], flags[1]
    for k in prange(chunk_tensor.shape[0]):
        i, s0, n = chunk_tensor[k], chunk_start[k], chunk_len[k]
        size = sizes[i]
        w, c = view(w_addr[i], size, w_mark), view(c_addr[i], size, w_mark)
        mst = view(mst_addr[i], size, np.float32(0))
        g = view(g_addr[i], size, g_mark)
        mean, var = view(m_addr[i], size, m_mark), view(v_addr[i], size, m_mark)
        o = view(o_addr[i], size, w_mark)
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        step = cast_like(steps[i], eps)
        tid = get_thread_id()
        wb, gb = scratch[tid, 0, :n], scratch[tid, 1, :n]
        effective_weights(w, c, mst, s0, n, wb, wmode)
        if recompute:
            for j in range(n):
                m, v = _moments(g[s0 + j], load(mean[s0 + j]), load(var[s0 + j]), rescale, clip, b1, b2, omb1,
                                omb2)
                mq, vq = rounded(m, m_mark), rounded(v, m_mark)
                mean[s0 + j] = mq
                var[s0 + j] = vq
                gb[j] = direction(load(mq), load(vq), wb[j], eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var)
        else:
            for j in range(n):
                gb[j] = direction(load(mean[s0 + j]), load(var[s0 + j]), wb[j], eps, wd, bias1, bias2, inv1, inv2,
                                  div_mean, div_var)
        write_weights(wb, gb, step, mst, c, o, s0, n, wmode, w_mark)


# ------------------------------------------------------------------ blocked formats ("8bit", "4bit")

@njit(inline="always")
def block_at(e, length, block, nb, half, fmark):
    """Block geometry of the block starting at element ``e`` of a tensor of rows of ``length``:
    ``(n, scale index, code base)`` (``nb`` blocks a row, ``half`` packed bytes a row)."""
    r = e // length
    col = e - r * length
    n = min(block, length - col)
    base = r * half + (col >> 1) if packed(fmark) else e
    return n, r * nb + col // block, base


@njit(cache=True, error_model="numpy")
def update_block(e, n, si, base, w, c, mst, g, mc, vc, ms, vs, wb, gb, mb, vb, qm, qv, seed, lev, wmode, write,
                 rescale, clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, fmark):
    """One block of phase 1 (the stages of the module docstring): ``wb[:n]``/``gb[:n]`` receive the
    effective weights and the directions from the new codes; with ``write`` the codes (at ``base``) and
    the scales (index ``si``) are overwritten — after every old code of the block was read."""
    n_levels, k_levels, inv_n, inv_k = lev[0], lev[1], lev[2], lev[3]
    effective_weights(w, c, mst, e, n, wb, wmode)
    a_old, b_old = ms[si], vs[si]
    a = np.float32(0.0)
    b = np.float32(0.0)
    for j in range(n):
        m, v = _moments(g[e + j], decode_mean(mean_code(mc, base, j, fmark), a_old, inv_n),
                        decode_var(var_code(vc, base, j, fmark), b_old, inv_k), rescale, clip, b1, b2, omb1, omb2)
        mb[j] = m
        vb[j] = v
        am = np.abs(m)
        if am > a or am != am:  # the block's max |m| and max v; NaN sticks (torch.amax)
            a = am
        if v > b or v != v:
            b = v
    ra, rb = reciprocal(a), reciprocal(b)
    for j in range(n):
        qm[j] = encode_mean(mb[j], ra, n_levels)
        qv[j] = encode_var(vb[j], rb, k_levels, dither(e + j, seed))
        gb[j] = direction(decode_mean(qm[j], a, inv_n), decode_var(qv[j], b, inv_k), wb[j], eps, wd, bias1, bias2,
                          inv1, inv2, div_mean, div_var)
    if write:
        put_codes(mc, base, qm, n, fmark)
        put_codes(vc, base, qv, n, fmark)
        ms[si] = a
        vs[si] = b


@njit(parallel=True, cache=True, error_model="numpy")
def phase1_blocked_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, ms_addr, vs_addr, geo, seeds, w_mark, g_mark,
                        fmark, scal, bias, flags, lev, block, item_tensor, item_start, item_len, partial, fscratch,
                        iscratch, wmode, write):
    """Phase 1 of the blocked formats (``fmark``: ``int8`` for 8 bits, ``uint8`` for 4) over work items of
    whole blocks, and their partial sums (see :func:`phase1_elementwise_pass`).  ``geo[i]`` = (numel,
    rows, L, blocks a row, code bytes a row (4-bit)), ``seeds[i]`` the dither's seed term of tensor
    ``i``'s step, ``lev`` = (N, K, RN(1/N), 1/K) float32, ``block`` = B."""
    div_mean, div_var = flags[0], flags[1]
    for k in prange(item_tensor.shape[0]):
        i, e0, ne = item_tensor[k], item_start[k], item_len[k]
        size, rows, length, nb, half = geo[i, 0], geo[i, 1], geo[i, 2], geo[i, 3], geo[i, 4]
        csize = rows * half if packed(fmark) else size
        w, c = view(w_addr[i], size, w_mark), view(c_addr[i], size, w_mark)
        mst = view(mst_addr[i], size, np.float32(0))
        g = view(g_addr[i], size, g_mark)
        mc, vc = view(m_addr[i], csize, fmark), view(v_addr[i], csize, np.uint8(0))
        ms, vs = view(ms_addr[i], rows * nb, np.float32(0)), view(vs_addr[i], rows * nb, np.float32(0))
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        tid = get_thread_id()
        e = e0
        while e < e0 + ne:
            n, si, base = block_at(e, length, block, nb, half, fmark)
            off = e - e0
            update_block(e, n, si, base, w, c, mst, g, mc, vc, ms, vs, fscratch[tid, 0, off:off + n],
                         fscratch[tid, 1, off:off + n], fscratch[tid, 2], fscratch[tid, 3], iscratch[tid, 0],
                         iscratch[tid, 1], seeds[i], lev, wmode, write, rescale, clip, b1, b2, omb1, omb2, eps, wd,
                         bias1, bias2, inv1, inv2, div_mean, div_var, fmark)
            e += n
        partial[k, 0], partial[k, 1] = sums_of_squares(fscratch[tid, 0, :ne], fscratch[tid, 1, :ne])
        partial[k, 2] = 0.0 if write else sum_of_squares(g[e0:e0 + ne])


@njit(parallel=True, cache=True, error_model="numpy")
def phase2_blocked_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, ms_addr, vs_addr, o_addr, geo, seeds, w_mark,
                        g_mark, fmark, scal, bias, flags, lev, steps, block, item_tensor, item_start, item_len,
                        fscratch, iscratch, wmode, recompute):
    """Phase 2 of the blocked formats: ``g`` from the stored codes and scales (``recompute``: phase 1's
    block update from the old ones, writing the new), then the weights (``wmode``)."""
    div_mean, div_var = flags[0], flags[1]
    for k in prange(item_tensor.shape[0]):
        i, e0, ne = item_tensor[k], item_start[k], item_len[k]
        size, rows, length, nb, half = geo[i, 0], geo[i, 1], geo[i, 2], geo[i, 3], geo[i, 4]
        csize = rows * half if packed(fmark) else size
        w, c = view(w_addr[i], size, w_mark), view(c_addr[i], size, w_mark)
        mst = view(mst_addr[i], size, np.float32(0))
        g = view(g_addr[i], size, g_mark)
        o = view(o_addr[i], size, w_mark)
        mc, vc = view(m_addr[i], csize, fmark), view(v_addr[i], csize, np.uint8(0))
        ms, vs = view(ms_addr[i], rows * nb, np.float32(0)), view(vs_addr[i], rows * nb, np.float32(0))
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        inv_n, inv_k = lev[2], lev[3]
        step = cast_like(steps[i], eps)
        tid = get_thread_id()
        e = e0
        while e < e0 + ne:
            n, si, base = block_at(e, length, block, nb, half, fmark)
            wb, gb = fscratch[tid, 0, :n], fscratch[tid, 1, :n]
            if recompute:
                update_block(e, n, si, base, w, c, mst, g, mc, vc, ms, vs, wb, gb, fscratch[tid, 2], fscratch[tid, 3],
                             iscratch[tid, 0], iscratch[tid, 1], seeds[i], lev, wmode, recompute, rescale, clip, b1, b2,
                             omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, fmark)
            else:
                effective_weights(w, c, mst, e, n, wb, wmode)
                a, b = ms[si], vs[si]
                for j in range(n):
                    gb[j] = direction(decode_mean(mean_code(mc, base, j, fmark), a, inv_n),
                                      decode_var(var_code(vc, base, j, fmark), b, inv_k), wb[j], eps, wd, bias1,
                                      bias2, inv1, inv2, div_mean, div_var)
            write_weights(wb, gb, step, mst, c, o, e, n, wmode, w_mark)
            e += n
