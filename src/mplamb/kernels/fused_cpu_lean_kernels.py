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
    g        = ((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd           (the update the codes give;
               a' = RN32(float64(a) / bias1), s' = sqrt(RN32(b / bias2)) per block  reference.blocked_direction)
    phase 2:   new = w - step * g;  p = RN(new), c = RN(new - float32(p)) | master = new, out = RN(new) | out = RN(new)

and per work item the float64 partial sums of ``w**2`` and ``g**2`` (and of ``grad**2`` in a dry
phase 1).  The element-wise formats take the full-state ``direction`` of the rounded moments
(:func:`.fused_cpu_kernels._direction`: the mean's bias correction a float64 division rounded to
float32, the variance's a float32 division), with the bias-correction regime read at run time (one
compiled loop serves every step count).

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
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.extending import intrinsic, overload

from .fused_cpu_kernels import (BIAS_BOTH, BIAS_NONE, BIAS_VAR, CHUNK, _bits_from_f32, _direction, _f32_from_bits,
                                _moments, cast_like, divide_by_constant, divide_in_float64, load, store,
                                sum_of_squares, view, wide_vectors)

__all__ = ["CHUNK", "PLAIN", "MASTER", "KAHAN", "phase1_elementwise_pass", "phase2_elementwise_pass",
           "phase1_blocked_pass", "phase2_blocked_pass"]

# how phase 2 writes the new weight ``new`` (a launch-wide, run-time mode)
PLAIN = 0  # out = RN(new)            (the weight, or a separate output)
MASTER = 1  # master = new; out = RN(new)
KAHAN = 2  # out = p = RN(new); comp = RN(new - float32(p))

_ABS = np.uint32(0x7FFFFFFF)
# How far ahead (in elements) update_item/apply_item ask for the next gradient and code lines;
# the software prefetch only hides latency, it never changes a result.
PREFETCH = 1024
_TWO_M24 = np.float32(2.0 ** -24)

# How the kernels are laid out for speed (every loop below is straight-line code over contiguous
# slices, so LLVM vectorises it, with 512-bit vectors where the CPU has them (``wide_vectors``); the
# arithmetic per element is unchanged): a work item is processed in stages, each one loop over the
# item or one of its blocks.  Phase 1: the effective weights and their sum of squares in one loop;
# then per block: decode the old codes and update the moments with the new scales (a max over the
# float bits: vectorises where a float max with NaN handling does not; 4 bits: one loop per nibble,
# the layout keeps each half of a block contiguous in the bytes), encode the mean, encode the
# variance and the updates from the codes (into integer scratch, one loop each), then the codes stored
# (4 bits: packed, one loop a moment; one loop for all three stages measured 10% slower in cache);
# then per item the updates' sum of squares.  The element-wise
# formats store the rounded moments and read the updates' moments back from the storage.  Phase 2
# of a block: (4 bits: unpack the codes, one loop per nibble) one loop from the codes to the new
# weight, then per item the rounding stores (the weight and its Kahan compensation in one loop, each
# rounding a call of ``rounded``); phase 2 of an element-wise chunk with Kahan weights is a single
# loop from the stored moments to both stores (the weights read and written through one array when
# they are their own output).  Run-time flags are tested once per item or block, never per element.
# The stages shared by several passes are functions of their own, called once per work item: each
# is compiled once, not inlined into every pass (compile time).  Within a work item a block is
# addressed by (unsigned) offsets into the item's arrays, never by slices: numba raises and drops the
# reference count of each array a block would create (an atomic call each), which in phase 2 cost
# more than the block's arithmetic.  Memory: the gradients and codes are asked for a block ahead
# (:data:`PREFETCH`), and the compute loops of a work item ask for the next item's weights (element-wise:
# and its gradients and moments) as they go, so that item's first loops, which stream them with little to
# compute, find them in L2 (:func:`prefetch_ahead`); element-wise chunks compute in spans of :data:`SPAN`
# for this.


# ------------------------------------------------------------------ element helpers

@intrinsic
def _mix32(typingctx, j, seed):
    """The 32-bit hash of :func:`mplamb.kernels.codec.dither` of ``(j + seed) mod 2**32`` in 32-bit
    integer operations (each one mod ``2**32``, as the hash is defined), so that loops over it
    vectorise in 32-bit lanes: ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
    x ^= x >> 16``, returned ``>> 8`` (< 2**24) as an int32."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        x = builder.add(builder.trunc(args[0], i32), builder.trunc(args[1], i32))
        for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x = builder.xor(x, builder.lshr(x, ir.Constant(i32, shift)))
            x = builder.mul(x, ir.Constant(i32, mul))
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, 16)))
        return builder.lshr(x, ir.Constant(i32, 8))

    return types.int32(types.int64, types.int64), codegen


def _llvm_prefetch(builder, pointer, locality: int) -> None:
    """Emit ``llvm.prefetch(pointer, read, locality, data cache)``: a hint only, it never faults and never changes
    a result."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = builder.module.globals.get("llvm.prefetch.p0i8")
    if fn is None:
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = ir.Function(builder.module, fnty, name="llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(pointer, i8p) if pointer.type != i8p else pointer, ir.Constant(i32, 0),
                      ir.Constant(i32, locality), ir.Constant(i32, 1)])


@intrinsic
def prefetch(typingctx, arr, idx):
    """Prefetch the cache line of ``arr[idx]`` into every cache level (high locality); no effect on results."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        _llvm_prefetch(builder, builder.gep(ary.data, [args[1]]), 3)
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


@intrinsic
def prefetch_address(typingctx, address):
    """Ask L2 for the cache line at the integer ``address`` (locality 2); no effect on results."""
    def codegen(context, builder, sig, args):
        _llvm_prefetch(builder, builder.inttoptr(args[0], ir.IntType(8).as_pointer()), 2)
        return context.get_dummy_value()

    return types.none(types.int64), codegen


def itemsize(mark):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(itemsize, inline="always")
def _itemsize(mark):
    """The bytes of one element of ``mark``'s type (a compile-time constant)."""
    size = mark.bitwidth // 8
    return lambda mark: size


# The next work item.  A work item starts with loops over its weights (and, element-wise, its moments) with
# little to compute meanwhile; numba's ``prange`` hands each thread a contiguous range of items, so a thread's
# next item is the one after its current one, and the compute loops of the current item ask for the next
# item's lines in step with their own progress (:data:`AHEAD` or :data:`SPAN` elements at a time): the next
# item then starts from L2.  The streams are integer addresses, so asking costs no reference counting (arrays
# passed inline do); the functions that find them are called, not inlined, in the parallel loops (numba's array
# analysis of a parallel loop fails on their inlined tuples).

@njit(cache=True)
def next_item(k, item_tensor, item_start, item_len):
    """``(tensor, first element, elements)`` of work item ``k + 1`` (0 elements after the last item)."""
    k = np.int64(k)  # prange's index may be unsigned: int64 arithmetic, not float64
    last = k + 1 >= item_tensor.shape[0]
    j = k if last else k + 1
    return item_tensor[j], item_start[j], 0 if last else item_len[j]


@njit(inline="always")
def stream(addresses, i, e0, mark, wanted):
    """``(address, bytes per element)`` of element ``e0`` of tensor ``i`` (``mark``'s type), ``(0, 0)`` unless
    ``wanted``."""
    size = itemsize(mark)
    return (addresses[i] + e0 * size, size) if wanted else (np.int64(0), np.int64(0))


@njit(cache=True)
def weight_streams(i, e0, w_addr, c_addr, mst_addr, w_mark, wmode):
    """The weight inputs ``wmode`` reads, from element ``e0`` of tensor ``i``: the weights (not with a master),
    the compensations (Kahan), the masters."""
    wa, ws = stream(w_addr, i, e0, w_mark, wmode != MASTER)
    ca, cs = stream(c_addr, i, e0, w_mark, wmode == KAHAN)
    ma, ms = stream(mst_addr, i, e0, np.float32(0), wmode == MASTER)
    return wa, ws, ca, cs, ma, ms


@njit(cache=True)
def next_weight_streams(k, item_tensor, item_start, item_len, w_addr, c_addr, mst_addr, w_mark, wmode):
    """``(elements, streams)`` of work item ``k + 1``: its weight inputs (:func:`weight_streams`), what the
    blocked formats ask for ahead (their gradients and codes are asked for a block ahead instead)."""
    i, e0, count = next_item(k, item_tensor, item_start, item_len)
    return count, weight_streams(i, e0, w_addr, c_addr, mst_addr, w_mark, wmode)


@njit(cache=True)
def elementwise_streams(k, chunk_tensor, chunk_start, chunk_len, w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr,
                        w_mark, g_mark, m_mark, wmode, gradients):
    """``(elements, streams)`` of element-wise chunk ``k + 1``: its weight inputs (:func:`weight_streams`), its
    gradients (with ``gradients``) and its stored moments."""
    i, e0, count = next_item(k, chunk_tensor, chunk_start, chunk_len)
    ga, gs = stream(g_addr, i, e0, g_mark, gradients)
    ma, ms = stream(m_addr, i, e0, m_mark, True)
    va, vs = stream(v_addr, i, e0, m_mark, True)
    return count, weight_streams(i, e0, w_addr, c_addr, mst_addr, w_mark, wmode) + (ga, gs, ma, ms, va, vs)


@njit(inline="always")
def prefetch_ahead(count, streams, off, n):
    """Ask L2 for elements ``off .. off+n-1`` (those below ``count``) of each stream ``(address, bytes per
    element)`` of ``streams`` (flat pairs)."""
    stop = min(off + n, count)
    if off < stop:
        for s in range(len(streams) // 2):
            a, size = streams[2 * s], streams[2 * s + 1]
            for b in range(off * size, stop * size, 64):
                prefetch_address(a + b)


# The element-wise formats' compute loops run in spans of SPAN elements, each span asking for its part of
# the next chunk (prefetch_ahead); the blocked formats' block loops ask for AHEAD elements of the next item
# whenever they pass that many (every 8-bit block, every other 4-bit block: as fast in a whole step as every
# block, and less work in cache).
SPAN = 512
AHEAD = 256


@njit(inline="always")
def dither(j, golden_seed):
    """:func:`mplamb.kernels.codec.dither` of element ``j``: ``golden_seed`` is the host's
    ``((t mod 2**31) * 0x9E3779B9 + offset) mod 2**32`` for the step ``t`` and the tensor's dither
    offset (:func:`_mix32`); ``(x >> 8) * 2**-24`` is exact in float32."""
    return np.float32(_mix32(np.int64(j), np.int64(golden_seed))) * _TWO_M24


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


@njit(inline="always")
def reciprocal(a):
    """``1/a`` in float32, 0 where ``a`` is not positive (codec's ``_reciprocal``)."""
    return np.float32(1.0) / a if a > 0 else np.float32(0.0)


@njit(inline="always")
def block_factors(a, b, bias1, bias2):
    """``(a', s')`` of a block with scales ``a``/``b``: ``RN32(float64(a) / bias1)`` and ``sqrt(RN32(b / bias2))``
    (``bias1`` float64, ``bias2`` float32; both 1 without bias correction)."""
    return np.float32(np.float64(a) / bias1), np.sqrt(b / bias2)


@njit(inline="always")
def direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var):
    """:func:`.fused_cpu_kernels._direction` with the bias-correction regime as run-time flags."""
    if div_mean:
        m = divide_in_float64(m, bias1, inv1)
    if div_var:
        v = divide_by_constant(v, bias2, inv2)
    return m / (np.sqrt(v) + eps) + w * wd


@njit(inline="always")
def factored_direction(m, v, w, eps, wd, am, sv):
    """``(m * a') / (sqrt(v) * s' + eps) + w * wd``: the update of ``"bf16"`` moments, the bias corrections
    as the per-tensor factors ``(a', s')`` = :func:`block_factors` ``(1, 1, bias1, bias2)`` (codec)."""
    return (m * am) / (np.sqrt(v) * sv + eps) + w * wd


BIAS_FACTORED = np.int16(0)  # a regime beside fused_cpu_kernels' BIAS_*: the update of factored_direction


def factored_regime(regime):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(factored_regime, inline="always")
def _factored_regime(regime):
    flag = regime == types.int16
    return lambda regime: flag


@njit(inline="always")
def regime_direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, am, sv, regime):
    """The update of one element in the compile-time ``regime``: :func:`factored_direction` with the factors
    ``am``/``sv`` (``BIAS_FACTORED``), else :func:`.fused_cpu_kernels._direction` (``BIAS_*``)."""
    if factored_regime(regime):
        return factored_direction(m, v, w, eps, wd, am, sv)
    return _direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, regime)


@njit(cache=True, error_model="numpy")
def directions(mb, vb, wb, gb, lo, hi, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored):
    """``gb[j] = direction(load(mb[j]), load(vb[j]), wb[j])`` for ``lo <= j < hi`` (``mb``/``vb``: float32
    scratch or the stored moments): the regime is tested once, each case a loop of its own with the regime a
    compile-time constant (:func:`.fused_cpu_kernels._direction`); ``factored``: :func:`factored_direction`."""
    wide_vectors()
    if factored:
        am, sv = block_factors(np.float32(1.0), np.float32(1.0), bias1, bias2)
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            gb[j] = factored_direction(load(mb[j]), load(vb[j]), wb[j], eps, wd, am, sv)
    elif div_mean and div_var:
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            gb[j] = _direction(load(mb[j]), load(vb[j]), wb[j], eps, wd, bias1, bias2, inv1, inv2, BIAS_BOTH)
    elif div_var and not div_mean:
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            gb[j] = _direction(load(mb[j]), load(vb[j]), wb[j], eps, wd, bias1, bias2, inv1, inv2, BIAS_VAR)
    elif not div_var and not div_mean:
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            gb[j] = _direction(load(mb[j]), load(vb[j]), wb[j], eps, wd, bias1, bias2, inv1, inv2, BIAS_NONE)
    else:  # the mean divided, the var not: no launcher asks for it
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            gb[j] = direction(load(mb[j]), load(vb[j]), wb[j], eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var)


def packed(fmark):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(packed, inline="always")
def _packed(fmark):
    """Whether the format marker says 4-bit (``uint8``: two codes a byte) rather than 8-bit (``int8``)."""
    flag = fmark == types.uint8
    return lambda fmark: flag


@njit(cache=True, error_model="numpy")
def effective_weights(w, c, mst, out, wmode):
    """``out`` = the effective weights (``wmode``) of the slices ``w``/``c``/``mst``: ``float32(p) +
    float32(c)`` with a compensation, the master, or the weight widened."""
    wide_vectors()
    n = out.shape[0]
    if wmode == KAHAN:
        for j in range(n):
            out[j] = load(w[j]) + load(c[j])
    elif wmode == MASTER:
        for j in range(n):
            out[j] = mst[j]
    else:
        for j in range(n):
            out[j] = load(w[j])


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def effective_weights_sumsq(w, c, mst, out, wmode):
    """:func:`effective_weights` and the float64 ``sum(out**2)`` of phase 1 in the same loop.  The fast-math
    flags serve the reduction (:func:`.fused_cpu_kernels.sum_of_squares`); the weights are unchanged by
    them: the Kahan sum is one float32 addition of two loaded values, with nothing to reassociate and no
    product to contract into it."""
    wide_vectors()
    n = out.shape[0]
    acc = 0.0
    if wmode == KAHAN:
        for j in range(n):
            x = load(w[j]) + load(c[j])
            out[j] = x
            acc += np.float64(x) * np.float64(x)
    elif wmode == MASTER:
        for j in range(n):
            x = mst[j]
            out[j] = x
            acc += np.float64(x) * np.float64(x)
    else:
        for j in range(n):
            x = load(w[j])
            out[j] = x
            acc += np.float64(x) * np.float64(x)
    return acc


@njit(cache=True, error_model="numpy")
def store_all(x, out, mark):
    """``out[j] = RN(x[j])`` in ``mark``'s format.  Each rounding store lives in a small function of
    its own, called once per work item: numba's IR inliner mishandles several inlined copies of the
    bfloat16 store in one function (``NumbaIRAssumptionWarning``), and one copy a loop still lets
    LLVM vectorise it."""
    wide_vectors()
    for j in range(x.shape[0]):
        out[j] = store(x[j], mark)


@njit(cache=True, error_model="numpy")
def round_all(x, mark):
    """``x[j] = float32(RN(x[j]))``: ``x`` rounded to ``mark``'s format in place (see :func:`store_all`)."""
    wide_vectors()
    for j in range(x.shape[0]):
        x[j] = load(store(x[j], mark))


@njit(cache=True, error_model="numpy")
def store_kahan(new, o, c, mark):
    """``o[j] = p = RN(new[j])`` and ``c[j] = RN(new[j] - float32(p))`` in ``mark``'s format: the new weights and
    their Kahan compensation in one loop (:func:`rounded`)."""
    wide_vectors()
    for j in range(new.shape[0]):
        p = rounded(new[j], mark)
        o[j] = p
        c[j] = rounded(new[j] - load(p), mark)


@njit(error_model="numpy")
def rounded(x, mark):
    """``RN(x)`` in ``mark``'s format (:func:`.fused_cpu_kernels.store`) as a function of its own: numba
    links it, and LLVM inlines it, so a loop may round twice (numba's IR inliner mishandles two inlined
    copies of the bfloat16 store in one function, see :func:`store_all`)."""
    return store(x, mark)


@njit(cache=True, error_model="numpy")
def store_step(wb, gb, step, o, mark):
    """``o[j] = RN(wb[j] - step * gb[j])`` in ``mark``'s format (one rounding store, see :func:`store_all`)."""
    wide_vectors()
    for j in range(wb.shape[0]):
        o[j] = store(wb[j] - step * gb[j], mark)


@njit(cache=True, error_model="numpy")
def store_step_kahan(wb, gb, step, o, c, mark):
    """``o[j] = p = RN(new)`` and ``c[j] = RN(new - float32(p))`` with ``new = wb[j] - step * gb[j]``: the new
    weights and their Kahan compensation in one loop."""
    wide_vectors()
    for j in range(wb.shape[0]):
        new = wb[j] - step * gb[j]
        p = rounded(new, mark)
        o[j] = p
        c[j] = rounded(new - load(p), mark)


@njit(cache=True, error_model="numpy")
def write_weights(wb, gb, step, mst, c, o, wmode, w_mark):
    """Phase 2's writes into the slices ``mst``/``c``/``o``: ``new = wb - step * gb`` stored as ``wmode``
    says (a master receives ``new``; ``new`` is recomputed per store rather than kept in scratch)."""
    wide_vectors()
    if wmode == KAHAN:
        store_step_kahan(wb, gb, step, o, c, w_mark)
    elif wmode == MASTER:
        for j in range(wb.shape[0]):
            mst[j] = wb[j] - step * gb[j]
        store_all(mst, o, w_mark)
    else:
        store_step(wb, gb, step, o, w_mark)


# ------------------------------------------------------------------ element-wise formats ("fp32", "bf16")

@njit(cache=True, error_model="numpy")
def update_elements(g, mean, var, wb, gb, mb, vb, m_mark, write, rescale, clip, b1, b2, omb1, omb2, eps, wd,
                    bias1, bias2, inv1, inv2, div_mean, div_var, factored, count, streams):
    """One chunk of the element-wise formats (slices ``g``/``mean``/``var``): ``gb`` = the directions from
    the new moments rounded to the format, ``wb`` the effective weights.  With ``write`` the rounded
    moments are stored and the directions read back from the storage; dry, they are rounded in place
    in the scratch ``mb``/``vb``.  The directions run in spans of :data:`SPAN`, each asking for its part of
    the next chunk (``count`` elements, ``streams``: :func:`prefetch_ahead`)."""
    wide_vectors()
    n = wb.shape[0]
    for j in range(n):
        m, v = _moments(g[j], load(mean[j]), load(var[j]), rescale, clip, b1, b2, omb1, omb2)
        mb[j] = m
        vb[j] = v
    if write:
        store_all(mb, mean, m_mark)
        store_all(vb, var, m_mark)
    else:
        round_all(mb, m_mark)
        round_all(vb, m_mark)
    for lo in range(0, n, SPAN):
        span = min(SPAN, n - lo)
        prefetch_ahead(count, streams, lo, span)
        if write:
            directions(mean, var, wb, gb, lo, lo + span, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var,
                       factored)
        else:
            directions(mb, vb, wb, gb, lo, lo + span, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var,
                       factored)


@njit(parallel=True, cache=True, error_model="numpy")
def phase1_elementwise_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal,
                            bias, flags, chunk_tensor, chunk_start, chunk_len, partial, scratch, wmode, write):
    """Phase 1 of the ``"fp32"``/``"bf16"`` formats (moments float32 or bfloat16 bits: ``m_mark``) and
    the per-chunk partial sums ``partial[k]`` = (w**2, g**2, grad**2 (dry only)).  ``scal[i]`` =
    (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd) float32 (clip +inf: off), ``bias[i]`` =
    (bias1, bias2, 1/bias1, 1/bias2) float64, ``flags`` = (divide the mean, divide the var, the update of
    :func:`factored_direction`).  The new
    moments are rounded to the format and written when ``write``; ``g`` uses the rounded values.
    ``scratch[thread]``: four float32 rows of :data:`CHUNK`."""
    div_mean, div_var, factored = flags[0], flags[1], flags[2]
    for k in prange(chunk_tensor.shape[0]):
        wide_vectors()
        i, s0, n = chunk_tensor[k], chunk_start[k], chunk_len[k]
        size = sizes[i]
        w, c = view(w_addr[i], size, w_mark)[s0:s0 + n], view(c_addr[i], size, w_mark)[s0:s0 + n]
        mst = view(mst_addr[i], size, np.float32(0))[s0:s0 + n]
        g = view(g_addr[i], size, g_mark)[s0:s0 + n]
        mean, var = view(m_addr[i], size, m_mark)[s0:s0 + n], view(v_addr[i], size, m_mark)[s0:s0 + n]
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        tid = get_thread_id()
        count, streams = elementwise_streams(k, chunk_tensor, chunk_start, chunk_len, w_addr, c_addr, mst_addr,
                                             g_addr, m_addr, v_addr, w_mark, g_mark, m_mark, wmode, True)
        wb, gb = scratch[tid, 0, :n], scratch[tid, 1, :n]
        partial[k, 0] = effective_weights_sumsq(w, c, mst, wb, wmode)
        update_elements(g, mean, var, wb, gb, scratch[tid, 2, :n], scratch[tid, 3, :n], m_mark, write, rescale,
                        clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored,
                        count, streams)
        partial[k, 1] = sum_of_squares(gb)
        partial[k, 2] = 0.0 if write else sum_of_squares(g)


@njit(inline="always")
def _kahan_elements(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, am, sv, regime, w_mark):
    """Phase 2 of elements ``lo .. hi-1`` of an element-wise chunk with Kahan weights, one loop: ``new = w - step *
    g`` from the stored moments (:func:`regime_direction`), ``o = p = RN(new)``, ``c = RN(new - float32(p))`` (``o``
    may be ``w`` itself)."""
    for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
        wj = load(w[j]) + load(c[j])
        new = wj - step * regime_direction(load(mean[j]), load(var[j]), wj, eps, wd, bias1, bias2, inv1, inv2, am, sv,
                                           regime)
        p = rounded(new, w_mark)
        o[j] = p
        c[j] = rounded(new - load(p), w_mark)


@njit(inline="always")
def _kahan_regimes(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored,
                   w_mark):
    """:func:`_kahan_elements` with the bias-correction regime a compile-time constant (as :func:`directions`)."""
    one = np.float32(1.0)
    if factored:
        am, sv = block_factors(one, one, bias1, bias2)
        _kahan_elements(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, am, sv, BIAS_FACTORED,
                        w_mark)
    elif div_mean and div_var:
        _kahan_elements(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, one, one, BIAS_BOTH,
                        w_mark)
    elif div_var and not div_mean:
        _kahan_elements(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, one, one, BIAS_VAR,
                        w_mark)
    elif not div_var and not div_mean:
        _kahan_elements(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, one, one, BIAS_NONE,
                        w_mark)
    else:  # the mean divided, the var not: no launcher asks for it
        for j in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no wraparound test
            wj = load(w[j]) + load(c[j])
            new = wj - step * direction(load(mean[j]), load(var[j]), wj, eps, wd, bias1, bias2, inv1, inv2,
                                        div_mean, div_var)
            p = rounded(new, w_mark)
            o[j] = p
            c[j] = rounded(new - load(p), w_mark)


@njit(cache=True, error_model="numpy")
def apply_elements_kahan(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var,
                         factored, w_mark):
    """:func:`_kahan_elements` into a separate output ``o``."""
    wide_vectors()
    _kahan_regimes(w, c, mean, var, o, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored,
                   w_mark)


@njit(cache=True, error_model="numpy")
def apply_elements_kahan_inplace(w, c, mean, var, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, div_mean,
                                 div_var, factored, w_mark):
    """:func:`_kahan_elements` with ``o`` the weights ``w``: one array read and written, so LLVM needs no
    run-time aliasing check to vectorise the loop."""
    wide_vectors()
    _kahan_regimes(w, c, mean, var, w, lo, hi, step, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored,
                   w_mark)


@njit(parallel=True, cache=True, error_model="numpy")
def phase2_elementwise_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, o_addr, sizes, w_mark, g_mark, m_mark,
                            scal, bias, flags, steps, chunk_tensor, chunk_start, chunk_len, scratch, wmode,
                            recompute):
    """Phase 2 of the ``"fp32"``/``"bf16"`` formats: ``g`` from the stored moments (``recompute``: from
    the old ones, as phase 1 does, and the new ones written), then the weights (``wmode``)."""
    div_mean, div_var, factored = flags[0], flags[1], flags[2]
    for k in prange(chunk_tensor.shape[0]):
        wide_vectors()
        i, s0, n = chunk_tensor[k], chunk_start[k], chunk_len[k]
        size = sizes[i]
        w, c = view(w_addr[i], size, w_mark)[s0:s0 + n], view(c_addr[i], size, w_mark)[s0:s0 + n]
        mst = view(mst_addr[i], size, np.float32(0))[s0:s0 + n]
        g = view(g_addr[i], size, g_mark)[s0:s0 + n]
        mean, var = view(m_addr[i], size, m_mark)[s0:s0 + n], view(v_addr[i], size, m_mark)[s0:s0 + n]
        o = view(o_addr[i], size, w_mark)[s0:s0 + n]
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        step = cast_like(steps[i], eps)
        tid = get_thread_id()
        wb, gb, mb, vb = scratch[tid, 0, :n], scratch[tid, 1, :n], scratch[tid, 2, :n], scratch[tid, 3, :n]
        if wmode == KAHAN and not recompute:  # in spans, each asking for its part of the next chunk
            count, streams = elementwise_streams(k, chunk_tensor, chunk_start, chunk_len, w_addr, c_addr, mst_addr,
                                                 g_addr, m_addr, v_addr, w_mark, g_mark, m_mark, wmode, False)
            inplace = o_addr[i] == w_addr[i]
            for lo in range(0, n, SPAN):
                span = min(SPAN, n - lo)
                prefetch_ahead(count, streams, lo, span)
                if inplace:
                    apply_elements_kahan_inplace(w, c, mean, var, lo, lo + span, step, eps, wd, bias1, bias2, inv1,
                                                 inv2, div_mean, div_var, factored, w_mark)
                else:
                    apply_elements_kahan(w, c, mean, var, o, lo, lo + span, step, eps, wd, bias1, bias2, inv1, inv2,
                                         div_mean, div_var, factored, w_mark)
            continue
        effective_weights(w, c, mst, wb, wmode)
        if recompute:
            count, streams = elementwise_streams(k, chunk_tensor, chunk_start, chunk_len, w_addr, c_addr, mst_addr,
                                                 g_addr, m_addr, v_addr, w_mark, g_mark, m_mark, wmode, True)
            update_elements(g, mean, var, wb, gb, mb, vb, m_mark, True, rescale, clip, b1, b2, omb1, omb2, eps, wd,
                            bias1, bias2, inv1, inv2, div_mean, div_var, factored, count, streams)
        else:
            directions(mean, var, wb, gb, 0, n, eps, wd, bias1, bias2, inv1, inv2, div_mean, div_var, factored)
        write_weights(wb, gb, step, mst, c, o, wmode, w_mark)


# ------------------------------------------------------------------ blocked formats ("8bit", "4bit")

@njit(inline="always")
def first_block(e, length, block, nb):
    """``(row, column, scale index)`` of the block starting at element ``e`` of a tensor of rows of
    ``length`` (``nb`` blocks a row): the walk's start; :func:`next_block` steps it without a division."""
    r = e // length
    col = e - r * length
    return r, col, r * nb + col // block


@njit(inline="always")
def block_at(r, col, e, length, block, half, fmark):
    """``(n, code base)`` of the block at row ``r``, column ``col`` (element ``e``): ``min(B, L - col)``
    elements, codes at ``e`` (8-bit) or ``r * half + col / 2`` (4-bit, ``half`` packed bytes a row)."""
    n = min(block, length - col)
    base = r * half + (col >> 1) if packed(fmark) else e
    return n, base


@njit(inline="always")
def next_block(r, col, si, n, length):
    """The walk's next block: ``(row, column, scale index)`` after the block of ``n`` elements."""
    col += n
    if col >= length:
        return r + 1, col - length, si + 1
    return r, col, si + 1


@njit(inline="always")
def stored_code(x, shift, signed, fmark):
    """The integer code of a stored byte ``x``: the byte itself (8-bit), or its nibble at ``shift`` (0: low, 4:
    high; 4-bit), a two's complement one when ``signed``."""
    if packed(fmark):
        y = (np.int32(x) >> np.int32(shift)) & np.int32(15)
        return ((y ^ np.int32(8)) - np.int32(8)) if signed else y
    return x


@njit(error_model="numpy")
def unpack_codes(mc, vc, base, n, qm, qv):
    """``qm[:n]``/``qv[:n]`` = the 4-bit mean (two's complement) and variance codes of a block of ``n``, its bytes
    at ``base``: per array two contiguous loops, the low nibbles then the high ones (unsigned indices: see
    :func:`apply_block_kahan`)."""
    wide_vectors()
    h = np.uint64((n + 1) >> 1)
    ub = np.uint64(base)
    for jj in range(h):
        qm[jj] = stored_code(mc[ub + jj], 0, True, np.uint8(0))
    for jj in range(np.uint64(n) - h):
        qm[h + jj] = stored_code(mc[ub + jj], 4, True, np.uint8(0))
    for jj in range(h):
        qv[jj] = stored_code(vc[ub + jj], 0, False, np.uint8(0))
    for jj in range(np.uint64(n) - h):
        qv[h + jj] = stored_code(vc[ub + jj], 4, False, np.uint8(0))


@njit(inline="always")
def code_bytes(n, fmark):
    """The bytes holding a block of ``n`` codes: ``n`` (8-bit), ``ceil(n / 2)`` (4-bit: element ``j < h`` in the
    low nibble of byte ``j``, element ``h + j`` in the high nibble of byte ``j``)."""
    return (n + 1) >> 1 if packed(fmark) else n


@njit(error_model="numpy")
def coded_update(q_m, q_v, w, am, sb, inv_n, inv_k, eps, wd):
    """The update of one element from its integer codes ``q_m``/``q_v`` and effective weight ``w``, with its block's
    factors ``am``/``sb`` (:func:`block_factors`): ``((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd``,
    ``t_m = q_m * RN(1/N)``, ``t_v = (q_v + 1) * (1/K)`` (:func:`mplamb.kernels.reference.blocked_direction`).  A
    function of its own, which LLVM inlines (numba's IR inliner mishandles several inlined copies)."""
    tm = np.float32(q_m) * inv_n
    tv = (np.float32(q_v) + np.float32(1.0)) * inv_k
    return ((tm * np.abs(tm)) * am) / ((tv * tv) * sb + eps) + w * wd


@njit(inline="always")
def encode_block(mb, vb, wb, gb, off, qm, qv, n, ra, rb, n_levels, k_levels, block_seed, am, sb, inv_n, inv_k, eps,
                 wd):
    """A block's encoding into the integer codes ``qm``/``qv[:n]`` (scratch) and its updates ``gb[off:off + n]`` from
    the codes, one loop a stage, from its new moments ``mb``/``vb`` and effective weights ``wb`` at ``off`` (``ra``,
    ``rb``: the reciprocals of its new scales; ``am``, ``sb``: its factors; indices unsigned, see
    :func:`update_item`, which stores the codes)."""
    uo = np.uint64(off)
    for j in range(np.uint64(n)):
        qm[j] = encode_mean(mb[uo + j], ra, n_levels)
    for j in range(np.uint64(n)):
        qv[j] = encode_var(vb[uo + j], rb, k_levels, dither(j, block_seed))
    for j in range(np.uint64(n)):
        gb[uo + j] = coded_update(qm[j], qv[j], wb[uo + j], am, sb, inv_n, inv_k, eps, wd)


@njit(inline="always")
def update_block(cm, cv, cb, shift, g, ge, mb, vb, off, n, a0, b0, inv_n, inv_k, rescale, clip, b1, b2, omb1, omb2,
                 fmark):
    """The new moments ``mb``/``vb[off:off + n]`` of ``n`` elements of a block from their stored codes (bytes
    ``cm``/``cv[cb:cb + n]``, the nibbles at ``shift`` for 4 bits: :func:`stored_code`), the block's old scales
    ``a0``/``b0`` and the gradients ``g[ge:ge + n]``, and the bit patterns of ``(max |m|, max v)``.  The maxima are
    taken over the magnitudes' bit patterns, which order like their values (NaN above inf, so NaN sticks as in
    ``torch.amax``; 0 for none): an integer max that vectorises (``v >= 0``, so ``max |v|`` is ``max v``)."""
    ia = np.uint32(0)
    ib = np.uint32(0)
    uc, ug, uo = np.uint64(cb), np.uint64(ge), np.uint64(off)
    for j in range(np.uint64(n)):
        m, v = _moments(g[ug + j], decode_mean(stored_code(cm[uc + j], shift, True, fmark), a0, inv_n),
                        decode_var(stored_code(cv[uc + j], shift, False, fmark), b0, inv_k), rescale, clip, b1, b2,
                        omb1, omb2)
        mb[uo + j] = m
        vb[uo + j] = v
        um = np.uint32(_bits_from_f32(m) & _ABS)
        uv = np.uint32(_bits_from_f32(v) & _ABS)
        ia = um if um > ia else ia
        ib = uv if uv > ib else ib
    return ia, ib


@njit(error_model="numpy")
def apply_block_kahan(cm, cv, cb, n, w, c, nb, off, am, sb, inv_n, inv_k, eps, wd, step):
    """Phase 2 of a block up to the rounding stores, for Kahan weights, one loop: ``nb[off + j] = new = w - step *
    g`` for ``j < n``, with ``w = float32(p) + float32(c)`` and ``g`` the update of the integer codes
    ``cm``/``cv[cb + j]`` (8-bit codes, or unpacked 4-bit ones; :func:`mplamb.kernels.reference.blocked_direction`).
    ``w``/``c``/``nb`` are the work item's arrays; the stores are :func:`store_new`'s, once per work item.

    The per-block functions of :func:`apply_item` address a block by offsets into the item's arrays, not by
    slices, and each weight mode is a function of its own rather than a branch of an inlined one: numba raises
    and drops the reference count of every array a block creates or passes inline (an atomic call each), which
    cost more than a block's arithmetic.  The indices are unsigned, so no index is tested for wraparound."""
    wide_vectors()
    uo, uc = np.uint64(off), np.uint64(cb)
    for j in range(np.uint64(n)):
        wj = load(w[uo + j]) + load(c[uo + j])
        nb[uo + j] = wj - step * coded_update(cm[uc + j], cv[uc + j], wj, am, sb, inv_n, inv_k, eps, wd)


@njit(error_model="numpy")
def apply_block_master(cm, cv, cb, n, mst, nb, off, am, sb, inv_n, inv_k, eps, wd, step):
    """:func:`apply_block_kahan` for master weights: ``w`` = the master, which receives ``new`` too."""
    wide_vectors()
    uo, uc = np.uint64(off), np.uint64(cb)
    for j in range(np.uint64(n)):
        wj = mst[uo + j]
        new = wj - step * coded_update(cm[uc + j], cv[uc + j], wj, am, sb, inv_n, inv_k, eps, wd)
        nb[uo + j] = new
        mst[uo + j] = new


@njit(error_model="numpy")
def apply_block_plain(cm, cv, cb, n, w, nb, off, am, sb, inv_n, inv_k, eps, wd, step):
    """:func:`apply_block_kahan` for plain weights: ``w = float32(p)``."""
    wide_vectors()
    uo, uc = np.uint64(off), np.uint64(cb)
    for j in range(np.uint64(n)):
        wj = load(w[uo + j])
        nb[uo + j] = wj - step * coded_update(cm[uc + j], cv[uc + j], wj, am, sb, inv_n, inv_k, eps, wd)


@njit(cache=True, error_model="numpy")
def store_new(nb, c, o, wmode, w_mark):
    """The rounding stores of phase 2 for the new weights ``nb``: ``o = RN(new)``, and with a compensation
    ``c = RN(new - float32(o))``."""
    wide_vectors()
    if wmode == KAHAN:
        store_kahan(nb, o, c, w_mark)
    else:
        store_all(nb, o, w_mark)


@njit(cache=True, error_model="numpy")
def apply_item(e0, ne, length, block, nb, half, mc, vc, ms, vs, w, c, mst, new, qm, qv, inv_n, inv_k, eps, wd, bias1,
               bias2, step, wmode, fmark, count, streams):
    """Phase 2 of the work item of elements ``e0 .. e0+ne-1`` (whole blocks) from the stored codes and scales up
    to the rounding stores: :func:`apply_block_kahan` (or its master or plain twin) per block into ``new[:ne]``
    (``w``/``c``/``mst``: the item's slices; ``qm``/``qv``, a block, are scratch for the unpacked 4-bit codes:
    :func:`unpack_codes`; ``count``/``streams``: the next item's weights, :func:`prefetch_ahead`)."""
    wide_vectors()
    r, col, si = first_block(e0, length, block, nb)
    e = e0
    asked = 0
    while e < e0 + ne:
        n, base = block_at(r, col, e, length, block, half, fmark)
        off = e - e0
        ahead = e + PREFETCH
        cahead = ahead >> 1 if packed(fmark) else ahead
        if cahead + block <= mc.shape[0]:
            for q in range(0, block, 64):
                prefetch(mc, cahead + q)
                prefetch(vc, cahead + q)
        if off >= asked:  # the next item's part at this offset, AHEAD elements at a time
            prefetch_ahead(count, streams, asked, AHEAD)
            asked += AHEAD
        am, sb = block_factors(ms[si], vs[si], bias1, bias2)
        if packed(fmark):
            unpack_codes(mc, vc, base, n, qm, qv)
            if wmode == KAHAN:
                apply_block_kahan(qm, qv, 0, n, w, c, new, off, am, sb, inv_n, inv_k, eps, wd, step)
            elif wmode == MASTER:
                apply_block_master(qm, qv, 0, n, mst, new, off, am, sb, inv_n, inv_k, eps, wd, step)
            else:
                apply_block_plain(qm, qv, 0, n, w, new, off, am, sb, inv_n, inv_k, eps, wd, step)
        elif wmode == KAHAN:
            apply_block_kahan(mc, vc, base, n, w, c, new, off, am, sb, inv_n, inv_k, eps, wd, step)
        elif wmode == MASTER:
            apply_block_master(mc, vc, base, n, mst, new, off, am, sb, inv_n, inv_k, eps, wd, step)
        else:
            apply_block_plain(mc, vc, base, n, w, new, off, am, sb, inv_n, inv_k, eps, wd, step)
        r, col, si = next_block(r, col, si, n, length)
        e += n


@njit(cache=True, error_model="numpy")
def update_item(e0, ne, length, block, nb, half, g, mc, vc, ms, vs, wb, gb, mb, vb, qm, qv, seed, lev, write,
                rescale, clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, fmark, count, streams):
    """Phase 1 of the work item of elements ``e0 .. e0+ne-1`` (whole blocks; the stages of the module
    docstring) block by block, given its effective weights ``wb[:ne]``: ``gb[:ne]`` receives the
    directions from the new codes; with ``write`` each block's codes and scales are overwritten once
    its old codes were read.  ``mb``/``vb`` (``ne``) and ``qm``/``qv`` (the block's integer codes) are scratch.  4-bit
    codes are decoded from the bytes in place, the low nibbles (the block's first ``ceil(n / 2)``
    elements) in one loop and the high ones in another.  ``count``/``streams``: the next item's weights,
    asked for :data:`AHEAD` elements at a time (:func:`prefetch_ahead`).  The stages are inlined and address
    the block by unsigned offsets into the item's arrays: no slice per block, so numba has no reference count to
    raise and drop per block (see :func:`apply_block_kahan`)."""
    wide_vectors()
    n_levels, k_levels, inv_n, inv_k = lev[0], lev[1], lev[2], lev[3]
    r, col, si = first_block(e0, length, block, nb)
    e = e0
    asked = 0
    while e < e0 + ne:
        n, base = block_at(r, col, e, length, block, half, fmark)
        off = e - e0
        ahead = e + PREFETCH
        if ahead + block <= g.shape[0]:
            for q in range(0, block, 32):
                prefetch(g, ahead + q)
            cahead = ahead >> 1 if packed(fmark) else ahead
            if cahead + block <= mc.shape[0]:
                for q in range(0, block, 64):
                    prefetch(mc, cahead + q)
                    prefetch(vc, cahead + q)
        if off >= asked:  # the next item's part at this offset, AHEAD elements at a time
            prefetch_ahead(count, streams, asked, AHEAD)
            asked += AHEAD
        h = code_bytes(n, fmark)
        ia, ib = update_block(mc, vc, base, 0, g, e, mb, vb, off, h, ms[si], vs[si], inv_n, inv_k, rescale, clip, b1,
                              b2, omb1, omb2, fmark)
        if packed(fmark):  # the high nibbles: the block's elements h .. n-1
            ja, jb = update_block(mc, vc, base, 4, g, e + h, mb, vb, off + h, n - h, ms[si], vs[si], inv_n, inv_k,
                                  rescale, clip, b1, b2, omb1, omb2, fmark)
            ia = ja if ja > ia else ia
            ib = jb if jb > ib else ib
        a, b = _f32_from_bits(np.uint32(ia)), _f32_from_bits(np.uint32(ib))
        ra, rb = reciprocal(a), reciprocal(b)
        am, sb = block_factors(a, b, bias1, bias2)
        block_seed = seed + e  # the dither of element e + j (mod 2**32: j's 32-bit induction vectorises)
        encode_block(mb, vb, wb, gb, off, qm, qv, n, ra, rb, n_levels, k_levels, block_seed, am, sb, inv_n, inv_k, eps,
                     wd)
        if write:  # every old code of the block was read (update_block above)
            ub = np.uint64(base)
            if packed(fmark):  # byte jj: code jj (low nibble), code h + jj (high; 0 past an odd block's end)
                h = np.uint64((n + 1) >> 1)
                if n & 1:
                    qm[n] = 0
                    qv[n] = 0
                for jj in range(h):  # one loop a moment: one loop for both measured slower
                    mc[ub + jj] = (qm[jj] & np.int32(15)) | ((qm[h + jj] & np.int32(15)) << np.int32(4))
                for jj in range(h):
                    vc[ub + jj] = (qv[jj] & np.int32(15)) | ((qv[h + jj] & np.int32(15)) << np.int32(4))
            else:
                for j in range(np.uint64(n)):
                    mc[ub + j] = qm[j]
                for j in range(np.uint64(n)):
                    vc[ub + j] = qv[j]
        if write:
            ms[si] = a
            vs[si] = b
        r, col, si = next_block(r, col, si, n, length)
        e += n


@njit(parallel=True, cache=True, error_model="numpy")
def phase1_blocked_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, ms_addr, vs_addr, geo, seeds, w_mark, g_mark,
                        fmark, scal, bias, lev, block, item_tensor, item_start, item_len, partial, fscratch,
                        iscratch, wmode, write):
    """Phase 1 of the blocked formats (``fmark``: ``int8`` for 8 bits, ``uint8`` for 4) over work items of
    whole blocks, and their partial sums (see :func:`phase1_elementwise_pass`).  ``geo[i]`` = (numel,
    rows, L, blocks a row, code bytes a row (4-bit)), ``seeds[i]`` the dither's seed term of tensor
    ``i``'s step, ``lev`` = (N, K, RN(1/N), 1/K) float32, ``block`` = B.  ``fscratch[thread]``: four
    float32 rows of :data:`CHUNK`; ``iscratch[thread]``: two int32 rows of at least B."""
    wide_vectors()
    for k in prange(item_tensor.shape[0]):
        i, e0, ne = item_tensor[k], item_start[k], item_len[k]
        size, rows, length, nb, half = geo[i, 0], geo[i, 1], geo[i, 2], geo[i, 3], geo[i, 4]
        csize = rows * half if packed(fmark) else size
        w, c = view(w_addr[i], size, w_mark)[e0:e0 + ne], view(c_addr[i], size, w_mark)[e0:e0 + ne]
        mst = view(mst_addr[i], size, np.float32(0))[e0:e0 + ne]
        g = view(g_addr[i], size, g_mark)
        mc, vc = view(m_addr[i], csize, fmark), view(v_addr[i], csize, np.uint8(0))
        ms, vs = view(ms_addr[i], rows * nb, np.float32(0)), view(vs_addr[i], rows * nb, np.float32(0))
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2 = bias[i, 0], cast_like(bias[i, 1], eps)
        tid = get_thread_id()
        count, streams = next_weight_streams(k, item_tensor, item_start, item_len, w_addr, c_addr, mst_addr, w_mark,
                                             wmode)
        wb, gb = fscratch[tid, 0, :ne], fscratch[tid, 1, :ne]
        partial[k, 0] = effective_weights_sumsq(w, c, mst, wb, wmode)
        update_item(e0, ne, length, block, nb, half, g, mc, vc, ms, vs, wb, gb, fscratch[tid, 2, :ne],
                    fscratch[tid, 3, :ne], iscratch[tid, 0], iscratch[tid, 1], seeds[i], lev, write, rescale, clip,
                    b1, b2, omb1, omb2, eps, wd, bias1, bias2, fmark, count, streams)
        partial[k, 1] = sum_of_squares(gb)
        partial[k, 2] = 0.0 if write else sum_of_squares(g[e0:e0 + ne])


@njit(parallel=True, cache=True, error_model="numpy")
def phase2_blocked_pass(w_addr, c_addr, mst_addr, g_addr, m_addr, v_addr, ms_addr, vs_addr, o_addr, geo, seeds, w_mark,
                        g_mark, fmark, scal, bias, lev, steps, block, item_tensor, item_start, item_len,
                        fscratch, iscratch, wmode, recompute):
    """Phase 2 of the blocked formats: ``g`` from the stored codes and scales (``recompute``: phase 1's
    item update from the old ones, writing the new), then the weights (``wmode``)."""
    wide_vectors()
    for k in prange(item_tensor.shape[0]):
        i, e0, ne = item_tensor[k], item_start[k], item_len[k]
        size, rows, length, nb, half = geo[i, 0], geo[i, 1], geo[i, 2], geo[i, 3], geo[i, 4]
        csize = rows * half if packed(fmark) else size
        w, c = view(w_addr[i], size, w_mark)[e0:e0 + ne], view(c_addr[i], size, w_mark)[e0:e0 + ne]
        mst = view(mst_addr[i], size, np.float32(0))[e0:e0 + ne]
        g = view(g_addr[i], size, g_mark)
        o = view(o_addr[i], size, w_mark)[e0:e0 + ne]
        mc, vc = view(m_addr[i], csize, fmark), view(v_addr[i], csize, np.uint8(0))
        ms, vs = view(ms_addr[i], rows * nb, np.float32(0)), view(vs_addr[i], rows * nb, np.float32(0))
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2 = bias[i, 0], cast_like(bias[i, 1], eps)
        step = cast_like(steps[i], eps)
        tid = get_thread_id()
        count, streams = next_weight_streams(k, item_tensor, item_start, item_len, w_addr, c_addr, mst_addr, w_mark,
                                             wmode)
        if recompute:
            wb, gb = fscratch[tid, 0, :ne], fscratch[tid, 1, :ne]
            effective_weights(w, c, mst, wb, wmode)
            update_item(e0, ne, length, block, nb, half, g, mc, vc, ms, vs, wb, gb, fscratch[tid, 2, :ne],
                        fscratch[tid, 3, :ne], iscratch[tid, 0], iscratch[tid, 1], seeds[i], lev, True, rescale, clip,
                        b1, b2, omb1, omb2, eps, wd, bias1, bias2, fmark, count, streams)
            write_weights(wb, gb, step, mst, c, o, wmode, w_mark)
        else:
            nw = fscratch[tid, 0, :ne]
            apply_item(e0, ne, length, block, nb, half, mc, vc, ms, vs, w, c, mst, nw, iscratch[tid, 0],
                       iscratch[tid, 1], lev[2], lev[3], eps, wd, bias1, bias2, step, wmode, fmark, count, streams)
            store_new(nw, c, o, wmode, w_mark)
