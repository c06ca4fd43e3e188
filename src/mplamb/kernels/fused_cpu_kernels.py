"""numba kernels of the fused CPU backend (the launch logic is in :mod:`.fused_cpu`).

Two passes over memory per step, parallel over fixed-size chunks of all tensors:

* :func:`phase1_pass`: reads grad, mean, var and the decay source ``w`` (the fp32 master
  or the weight), writes the new mean and var, and accumulates per-chunk float64 sums of
  ``w**2`` and ``g**2`` where ``g`` is the phase-1 direction (never stored);
* ``phase2_*_pass``: recomputes ``g`` from the stored mean/var and ``w`` and writes
  ``w - step * g`` in place, to the master and the rounded weight, or to an output.

The *dry* form (``write=False`` in phase 1, ``recompute=True`` in phase 2) moves the
moment writes to phase 2, which recomputes the same moments from the gradient; phase 1
then writes nothing and also sums the raw gradients' squares (see the contract).

The elementwise math is the reference's, operation for operation, in the compute
dtype (float32, or float64 for float64 tensors); no fast-math flags, so LLVM neither
reassociates nor contracts into FMAs and results are bit-identical to the reference.
Half-precision tensors arrive as raw 16-bit patterns: bfloat16 as ``uint16`` and
float16 as ``int16`` arrays (numba has no CPU float16); :func:`load` widens them
exactly and :func:`store` rounds to nearest-even as torch does.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, get_thread_id, njit, prange, types
from numba.extending import intrinsic, overload

CHUNK = 8192  # elements per parallel work item; the only temporary is one such buffer per thread


# ------------------------------------------------------------------ low-level helpers

@intrinsic
def _pointer(typingctx, address, marker):
    """``address`` (int64) as a typed pointer to elements of ``marker``'s type."""
    ptr_type = types.CPointer(marker)
    sig = ptr_type(address, marker)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return sig, codegen


def _bitcast(src, dst):
    """An intrinsic reinterpreting the bits of a ``src`` scalar as ``dst`` (same width)."""
    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(dst))

        return dst(src), codegen

    return cast


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` with a single rounding (LLVM's ``llvm.fma.f64``; an FMA instruction where the CPU has one)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f64], ir.FunctionType(f64, [f64, f64, f64]))
        return builder.call(fn, args)

    return sig, codegen


_f32_from_bits = _bitcast(types.uint32, types.float32)
_bits_from_f32 = _bitcast(types.float32, types.uint32)


def _converts_half_in_hardware() -> bool:
    """Whether LLVM turns float16 <-> float32 conversions into instructions here: numba compiles for
    the host CPU (its default) and that CPU is x86 with F16C (``vcvtph2ps``/``vcvtps2ph``, 8 lanes at
    a time) or AArch64 (``fcvt``).  Elsewhere LLVM would call a runtime routine that numba may not
    link, so the kernels convert in integer arithmetic instead (:func:`f16_load_soft`)."""
    import platform

    import numba
    from llvmlite import binding as llvm

    if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES is not None:
        return False  # code for another CPU, or features set by hand: F16C is not certain
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # feature detection unavailable
        return False


HARDWARE_HALF = _converts_half_in_hardware()


@intrinsic
def f16_load_hw(typingctx, bits):
    """float16 bits (int16) widened to float32 by LLVM's ``fpext half`` (exact; vectorised to
    ``vcvtph2ps``)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def f16_store_hw(typingctx, x):
    """float32 rounded to float16 bits (int16) by LLVM's ``fptrunc`` (IEEE round to nearest even,
    subnormals and overflow to inf included; ``vcvtps2ph``)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def wide_vectors(typingctx):
    """Lets LLVM vectorise the calling function with 512-bit registers where the CPU has them (AVX-512).

    Adds the function attributes ``"prefer-vector-width"="512"`` and ``"min-legal-vector-width"="512"``
    to the function being compiled.  LLVM's default on AVX-512 CPUs is 256-bit vectors (a
    process-wide tuning that numba inherits); per function, the wider vectors halve the
    instructions of a loop.  Only the width changes, not the operations: every IEEE operation
    is rounded as before and FMA contraction stays off, so results are unchanged.  CPUs without
    AVX-512 ignore the attributes.  (llvmlite's attribute set accepts only flag attributes; the
    string attributes are added to it as the textual IR spells them.)"""
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        for attribute in ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"'):
            set.add(attributes, attribute)
        return context.get_dummy_value()

    return types.none(), codegen


@njit(inline="always")
def view(address, size, marker):
    """The ``size`` elements at ``address`` as a 1-d array of ``marker``'s type."""
    return carray(_pointer(address, marker), (size,))


@njit(inline="always")
def f16_load_soft(x):
    """float16 bits (int16) widened to float32 in integer arithmetic, branch-free (F. Giesen's
    ``half_to_float``): the kernels' conversion where :data:`HARDWARE_HALF` is False."""
    h = np.uint32(np.uint16(x))
    o = (h & np.uint32(0x7FFF)) << np.uint32(13)
    exp = o & np.uint32(0x0F800000)
    o = o + np.uint32(112 << 23) + np.uint32(112 << 23) * np.uint32(exp == np.uint32(0x0F800000))  # inf/NaN
    subnormal = _bits_from_f32(_f32_from_bits(o + np.uint32(1 << 23)) - _f32_from_bits(np.uint32(113 << 23)))
    is_sub = np.uint32(0) - np.uint32(exp == np.uint32(0))  # all ones for subnormals and zero
    value = (subnormal & is_sub) | (o & ~is_sub)  # branch-free select
    return _f32_from_bits(value | ((h & np.uint32(0x8000)) << np.uint32(16)))


@njit(inline="always")
def f16_store_soft(x):
    """float32 rounded to nearest even float16 bits (int16) in integer arithmetic (F. Giesen's
    ``float_to_half_rtne``; NaN becomes 0x7E00 with its sign)."""
    u = _bits_from_f32(x)
    sign = u & np.uint32(0x80000000)
    a = u ^ sign
    big = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)  # NaN / inf or overflow
    magic = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
    small = _bits_from_f32(_f32_from_bits(a) + _f32_from_bits(magic)) - magic  # subnormal or zero
    odd = (a >> np.uint32(13)) & np.uint32(1)
    normal = (a + np.uint32(0xC8000FFF) + odd) >> np.uint32(13)  # ((15 - 127) << 23) + 0xfff, mod 2**32
    o = big if a >= np.uint32((127 + 16) << 23) else (small if a < np.uint32(113 << 23) else normal)
    return np.int16(np.uint16(o | (sign >> np.uint32(16))))


def load(x):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


def store(x, marker):  # pragma: no cover
    raise NotImplementedError


def cast_like(x, ref):  # pragma: no cover
    raise NotImplementedError


@overload(cast_like, inline="always")
def _cast_like(x, ref):
    if ref == types.float32:
        return lambda x, ref: np.float32(x)
    if ref == types.float64:
        return lambda x, ref: np.float64(x)
    return None


@overload(load, inline="always")
def _load(x):
    if x == types.float32 or x == types.float64:
        return lambda x: x
    if x == types.uint16:  # bfloat16 bits: exact widening
        return lambda x: _f32_from_bits(np.uint32(x) << np.uint32(16))
    if x == types.int16:  # float16 bits
        return (lambda x: f16_load_hw(x)) if HARDWARE_HALF else (lambda x: f16_load_soft(x))
    return None


@overload(store, inline="always")
def _store(x, marker):
    if marker == types.float32 or marker == types.float64:
        return lambda x, marker: cast_like(x, marker)
    if marker == types.uint16:  # float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0 (torch's rule)
        def bf16(x, marker):
            u = _bits_from_f32(x)
            rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            return np.uint16(np.uint32(0x7FC0) if nan else rounded)  # one select on 32-bit lanes, then narrowed
        return bf16
    if marker == types.int16:  # float32 -> float16 bits, round to nearest even
        return (lambda x, marker: f16_store_hw(x)) if HARDWARE_HALF else (lambda x, marker: f16_store_soft(x))
    return None


# ------------------------------------------------------------------ the math (shared by both passes)

def divide_by_constant(x, d, inv):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(divide_by_constant, inline="always")
def _divide_by_constant(x, d, inv):
    """``x / d`` correctly rounded, for a float32 ``x`` and a float32 constant ``d`` as the float64
    multiplication ``x * inv`` (``inv = RN64(1/d)``) rounded to float32 — exact for every input.

    Proof sketch: ``q = x * inv`` is within ``2**-52`` (relative) of ``x / d``.  Rounding ``q``
    could only differ if a float32 midpoint ``M`` (an odd 25-bit significand) lay that close to
    ``x / d``; but ``x - d*M`` is a non-zero multiple of ``2**(e_d + e_M)``, at least ``2**-49 |x|``
    (24-bit ``x`` and ``d``, 25-bit ``M``), and it cannot be zero (``d*M`` has an odd part of at
    least 25 bits).  The same lattice argument covers subnormal results; inf, NaN and zeros pass
    through unchanged.  Checked exhaustively over many divisors in ``tests/test_ieee.py``.
    float64 has no wider type to multiply in: it divides.
    """
    if x == types.float32:
        return lambda x, d, inv: np.float32(np.float64(x) * inv)
    if x == types.float64:
        return lambda x, d, inv: x / d
    return None


def divide_in_float64(x, d, inv):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(divide_in_float64, inline="always")
def _divide_in_float64(x, d, inv):
    """MXNet's ``float(double(x) / d)`` for a float32 ``x`` and a float64 constant ``d`` without a
    division: Markstein's correction of the reciprocal product, ``q = x * inv``,
    ``r = fma(-q, d, x)`` (exact), ``q' = fma(r, inv, q)``, is the correctly rounded float64
    quotient when ``inv = RN(1/d)`` (P. Markstein, IBM J. Res. Dev. 1990; the division chapter
    of the Handbook of Floating-Point Arithmetic), with no overflow or underflow in float64 for
    float32 ``x`` and ``d`` in (0, 1].  Zeros keep their sign (an OR of the sign bit); an infinite
    ``x`` gives NaN instead of inf, which only happens with an infinite ``var`` too, where the
    direction is NaN either way.  Checked against the division in ``tests/test_ieee.py``.
    float64 ``x`` divides."""
    if x == types.float32:
        def f32(x, d, inv):
            x64 = np.float64(x)
            q = x64 * inv
            q = fma(fma(-q, d, x64), inv, q)
            # -0 / d gives +0 through the correction; the sign bit of x restores it (no select;
            # for every other x the quotient already carries that sign)
            return _f32_from_bits(_bits_from_f32(np.float32(q)) | (_bits_from_f32(x) & np.uint32(0x80000000)))
        return f32
    if x == types.float64:
        return lambda x, d, inv: x / d
    return None


# Which bias corrections a compiled loop performs.  The launcher picks the cheapest exact one
# per launch from the scalar table (:func:`mplamb.kernels.fused_cpu.bias_regime`) and passes it
# as a marker whose *type* selects the compiled loop, as the dtype marks do: the choice is made
# once per launch, never per element.  Skipping a division is exact only because the divisor is
# exactly 1 (``x / 1`` is ``x`` bit for bit): ``1 - beta1**t`` rounds to 1 in float64 once
# ``beta1**t < 2**-54`` (from t = 356 at beta1 = 0.9), ``1 - beta2**t`` to 1 in float32 once
# ``beta2**t < 2**-25`` (from t = 17,321 at beta2 = 0.999); before that both divide.
BIAS_BOTH = np.float64(0)  # mean and var divided
BIAS_VAR = np.float32(0)  # var only: the mean's divisor is exactly 1
BIAS_NONE = np.int8(0)  # neither: no bias correction, or both divisors exactly 1


def divides_mean(regime):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


def divides_var(regime):  # pragma: no cover
    raise NotImplementedError


@overload(divides_mean, inline="always")
def _divides_mean(regime):
    flag = regime == types.float64
    return lambda regime: flag


@overload(divides_var, inline="always")
def _divides_var(regime):
    flag = regime != types.int8
    return lambda regime: flag


@njit(inline="always")
def _direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, regime):
    """``g = mean_hat / (sqrt(var_hat) + eps) + wd * w`` in the compute dtype.

    ``mean_hat`` is MXNet's float64 division by ``bias1`` (:func:`divide_in_float64`),
    ``var_hat = var / bias2`` a float32 division (:func:`divide_by_constant`); ``regime``
    (``BIAS_*``) says which of them the loop performs (a compile-time constant)."""
    if divides_mean(regime):
        m = divide_in_float64(m, bias1, inv1)
    if divides_var(regime):
        v = divide_by_constant(v, bias2, inv2)
    return m / (np.sqrt(v) + eps) + w * wd


@njit(fastmath={"reassoc", "contract"})
def sum_of_squares(x):
    """float64 ``sum(x**2)`` of one chunk.  Only this reduction may be reassociated (and so
    vectorised); the sum order is fixed by the compiled code, so results are deterministic.
    No ``nnan``/``ninf`` flags: NaN and inf propagate, which the non-finite check relies on."""
    wide_vectors()
    acc = 0.0
    for j in range(x.shape[0]):
        v = np.float64(load(x[j]))
        acc += v * v
    return acc


@njit(fastmath={"reassoc", "contract"})
def sums_of_squares(x, y):
    """:func:`sum_of_squares` of two arrays of one length in one loop (measured 10% faster per
    phase 1 than two loops: one loop's overhead, twice the independent work per iteration)."""
    wide_vectors()
    acc_x = 0.0
    acc_y = 0.0
    for j in range(x.shape[0]):
        u = np.float64(load(x[j]))
        v = np.float64(load(y[j]))
        acc_x += u * u
        acc_y += v * v
    return acc_x, acc_y


# ------------------------------------------------------------------ passes

@njit(inline="always")
def _moments(gj, mj, vj, rescale, clip, b1, b2, omb1, omb2):
    """New ``(mean, var)`` of one element from its raw gradient.  ``clip = +inf`` when clipping is
    off (the launcher's ``scalar_tables(..., clip_off=inf)``): both selects then keep every
    ``s``, infinities and NaN included, so the loop needs no branch on it (a branch that LLVM would
    turn into selects on every element anyway)."""
    s = load(gj) * rescale
    s = clip if s > clip else s
    s = -clip if s < -clip else s
    return mj * b1 + s * omb1, vj * b2 + (s * omb2) * s


@njit(inline="always")
def _moments_stored(g, mean, var, j, rescale, clip, b1, b2, omb1, omb2):
    """:func:`_moments` of element ``j``, written back to ``mean``/``var`` (a writing phase 1, or
    phase 2 after a dry one)."""
    m, v = _moments(g[j], mean[j], var[j], rescale, clip, b1, b2, omb1, omb2)
    mean[j] = m
    var[j] = v
    return m, v


@njit(parallel=True, cache=True)
def phase1_pass(w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark,
                scal, bias, chunk_tensor, chunk_start, chunk_len, partial, scratch, write, regime):
    """Phase 1 + local squared norms.  ``scal[i]`` = (rescale, clip, beta1, beta2, 1-beta1, 1-beta2,
    eps, wd) in the compute dtype (clip = +inf: off); ``bias[i]`` = (bias1, bias2, 1/bias1, 1/bias2) as
    float64, read as ``regime`` says (``BIAS_*``).
    ``partial[k]`` receives (sum w**2, sum g**2, sum grad**2) of chunk ``k``; the moments are written
    only when ``write`` (the gradients' column only when not)."""
    for k in prange(chunk_tensor.shape[0]):
        i = chunk_tensor[k]
        s0 = chunk_start[k]
        n = chunk_len[k]
        size = sizes[i]
        w = view(w_addr[i], size, w_mark)[s0:s0 + n]
        g = view(g_addr[i], size, g_mark)[s0:s0 + n]
        mean = view(m_addr[i], size, m_mark)[s0:s0 + n]
        var = view(v_addr[i], size, m_mark)[s0:s0 + n]
        rescale, clip, b1, b2, omb1, omb2, eps, wd = scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], \
            scal[i, 4], scal[i, 5], scal[i, 6], scal[i, 7]
        bias1, bias2, inv1, inv2 = bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3]
        dirs = scratch[get_thread_id(), :n]  # the chunk's directions
        if write:
            for j in range(n):
                m, v = _moments_stored(g, mean, var, j, rescale, clip, b1, b2, omb1, omb2)
                dirs[j] = _direction(m, v, load(w[j]), eps, wd, bias1, bias2, inv1, inv2, regime)
            partial[k, 2] = 0.0
        else:
            for j in range(n):
                m, v = _moments(g[j], mean[j], var[j], rescale, clip, b1, b2, omb1, omb2)
                dirs[j] = _direction(m, v, load(w[j]), eps, wd, bias1, bias2, inv1, inv2, regime)
            partial[k, 2] = sum_of_squares(g)
        partial[k, 0], partial[k, 1] = sums_of_squares(w, dirs)


@njit(inline="always")
def _new_weight(m, v, w, step, eps, wd, bias1, bias2, inv1, inv2, regime):
    """Phase 2 for one element: ``w - step * g`` with ``g`` recomputed from the moments."""
    return w - step * _direction(m, v, w, eps, wd, bias1, bias2, inv1, inv2, regime)


@njit(inline="always")
def _phase2_chunk(k, w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal, bias, steps,
                  chunk_tensor, chunk_start, chunk_len):
    """The arrays and scalars of chunk ``k`` in phase 2: (tensor, start, length, w, grad, mean, var,
    rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd, bias1, bias2, 1/bias1, 1/bias2, step)."""
    i, s0, n = chunk_tensor[k], chunk_start[k], chunk_len[k]
    size = sizes[i]
    w = view(w_addr[i], size, w_mark)[s0:s0 + n]
    g = view(g_addr[i], size, g_mark)[s0:s0 + n]
    mean = view(m_addr[i], size, m_mark)[s0:s0 + n]
    var = view(v_addr[i], size, m_mark)[s0:s0 + n]
    eps, wd = scal[i, 6], scal[i, 7]
    return (i, s0, n, w, g, mean, var, scal[i, 0], scal[i, 1], scal[i, 2], scal[i, 3], scal[i, 4], scal[i, 5],
            eps, wd, bias[i, 0], cast_like(bias[i, 1], eps), bias[i, 2], bias[i, 3], cast_like(steps[i], eps))


# Three loop bodies, so that LLVM sees exactly which arrays are written: an in-place update
# (``w`` read and written through one array: no aliasing checks, vectorised), a master update
# (master and rounded output), and an update into a separate output (the operators' ``out=``).
# Each has two loops: moments read (after a writing phase 1) or recomputed and written (after
# a dry one).

@njit(parallel=True, cache=True)
def phase2_inplace_pass(w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal, bias, steps,
                        chunk_tensor, chunk_start, chunk_len, recompute, regime):
    """``w = w - step * g`` in place."""
    for k in prange(chunk_tensor.shape[0]):
        i, s0, n, w, g, mean, var, rescale, clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, step = \
            _phase2_chunk(
            k, w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal, bias, steps,
            chunk_tensor, chunk_start, chunk_len)
        if recompute:
            for j in range(n):
                m, v = _moments_stored(g, mean, var, j, rescale, clip, b1, b2, omb1, omb2)
                w[j] = store(_new_weight(m, v, load(w[j]), step, eps, wd, bias1, bias2, inv1, inv2, regime), w_mark)
        else:
            for j in range(n):
                new = _new_weight(mean[j], var[j], load(w[j]), step, eps, wd, bias1, bias2, inv1, inv2, regime)
                w[j] = store(new, w_mark)


@njit(parallel=True, cache=True)
def phase2_master_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sizes, w_mark, g_mark, m_mark, o_mark, scal, bias,
                       steps, chunk_tensor, chunk_start, chunk_len, recompute, regime):
    """``master = master - step * g`` in place and ``out = dtype(master)``."""
    for k in prange(chunk_tensor.shape[0]):
        i, s0, n, w, g, mean, var, rescale, clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, step = \
            _phase2_chunk(
            k, w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal, bias, steps,
            chunk_tensor, chunk_start, chunk_len)
        out = view(o_addr[i], sizes[i], o_mark)[s0:s0 + n]
        if recompute:
            for j in range(n):
                m, v = _moments_stored(g, mean, var, j, rescale, clip, b1, b2, omb1, omb2)
                w[j] = _new_weight(m, v, w[j], step, eps, wd, bias1, bias2, inv1, inv2, regime)
        else:
            for j in range(n):
                w[j] = _new_weight(mean[j], var[j], w[j], step, eps, wd, bias1, bias2, inv1, inv2, regime)
        for j in range(n):  # the rounded copy in a loop of its own (the chunk is in cache): it vectorises better
            out[j] = store(w[j], o_mark)


@njit(parallel=True, cache=True)
def phase2_out_pass(w_addr, g_addr, m_addr, v_addr, o_addr, sizes, w_mark, g_mark, m_mark, o_mark, scal, bias,
                    steps, chunk_tensor, chunk_start, chunk_len, recompute, regime):
    """``out = w - step * g`` (``w`` only read)."""
    for k in prange(chunk_tensor.shape[0]):
        i, s0, n, w, g, mean, var, rescale, clip, b1, b2, omb1, omb2, eps, wd, bias1, bias2, inv1, inv2, step = \
            _phase2_chunk(
            k, w_addr, g_addr, m_addr, v_addr, sizes, w_mark, g_mark, m_mark, scal, bias, steps,
            chunk_tensor, chunk_start, chunk_len)
        out = view(o_addr[i], sizes[i], o_mark)[s0:s0 + n]
        if recompute:
            for j in range(n):
                m, v = _moments_stored(g, mean, var, j, rescale, clip, b1, b2, omb1, omb2)
                out[j] = store(_new_weight(m, v, load(w[j]), step, eps, wd, bias1, bias2, inv1, inv2, regime), o_mark)
        else:
            for j in range(n):
                new = _new_weight(mean[j], var[j], load(w[j]), step, eps, wd, bias1, bias2, inv1, inv2, regime)
                out[j] = store(new, o_mark)


@njit(parallel=True, cache=True)
def grad_sumsq_pass(g_addr, sizes, g_mark, chunk_tensor, chunk_start, chunk_len, partial):
    """Per-chunk float64 sums of squares of raw gradients."""
    for k in prange(chunk_tensor.shape[0]):
        i = chunk_tensor[k]
        s0 = chunk_start[k]
        n = chunk_len[k]
        partial[k, 0] = sum_of_squares(view(g_addr[i], sizes[i], g_mark)[s0:s0 + n])


@njit(cache=True)
def sum_chunks(partial, chunk_tensor, n_tensors):
    """Per-tensor sums of per-chunk partials, in chunk order (deterministic)."""
    out = np.zeros((partial.shape[1], n_tensors), dtype=np.float64)
    for k in range(chunk_tensor.shape[0]):
        for c in range(partial.shape[1]):
            out[c, chunk_tensor[k]] += partial[k, c]
    return out
