"""Triton kernels of the GPU backend's *lean* step (the launch logic is in :mod:`.triton_lean`).

The lean step (:func:`mplamb.kernels.reference.lean_update`) keeps the moments in a storage format
of :mod:`.codec` and/or the weights Kahan-compensated.  These kernels perform the reference's
arithmetic element for element, in the same order, in float32, with correctly rounded division
and square root (``tl.div_rn``, ``tl.sqrt_rn``) and FMA contraction turned off by the launcher, so
every code, scale, weight, compensation and master is bit-identical to the reference's.  The
formats (blocks, companding, dither, packing) are specified in the docstring of :mod:`.codec` and
not repeated here; per element of tensor ``i``::

    w        = float32(p) + float32(c)   (KAHAN)  |  master (MASTER)  |  float32(p) (PLAIN)
    m0, v0   = decode(old codes, old scales)
    s        = clip(float32(grad) * rescale)
    m        = m0 * beta1 + s * (1 - beta1);    v = v0 * beta2 + (s * (1 - beta2)) * s
    a, b     = max |m|, max v over the block        (integer max of the magnitudes' bits: NaN sticks)
    qm, qv   = encode(m, 1/a), encode(v, 1/b, dither(j, t))
    g        = ((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd,
               a' = RN32(float64(a) / bias1),  s' = sqrt(RN32(b / bias2))      (once per block)
    phase 2:   new = w - step * g;  p = RN(new), c = RN(new - float32(p)) | master = new, out = RN(new)
               | out = RN(new)

The element-wise formats (``"fp32"``, ``"bf16"``) round the new moments to the format and take the
direction of the rounded values: ``"fp32"`` the full-state one (:func:`.triton_kernels._direction`),
``"bf16"`` the codec's ``(m * a') / (sqrt(v) * s' + eps) + w * wd`` with the per-tensor factors
``(a', s')`` of a block of scales 1 (:func:`_factored_direction`).  Phase 1 adds per
program the float64 partial sums of ``w**2``, ``g**2`` and, in a dry phase 1, ``grad**2``; they are
reduced per tensor in a fixed order (:func:`.triton_kernels.sum_blocks_kernel`).

*Programs.*  Element-wise formats: one program per :data:`BLOCK` elements of one tensor (as the
full-state kernels).  Blocked formats: one program per ``NBLK`` consecutive codec blocks of one
tensor (blocks are numbered row by row, ``rows * ceil(L / B)`` per tensor; ``tid``/``first`` map
programs to tensors), seen as a tile ``[NBLK, HALF, 2]``: slot ``(jj, h)`` of block ``k`` is element
``r * L + col + 2 * jj + h`` (``r``/``col`` its row and first column), for 4 bits ``r * L + col + jj +
h * ceil(n / 2)``, the code in nibble ``h`` of the block's byte ``jj`` (a block of ``n`` elements keeps
its halves in the low and high nibbles: :mod:`.codec`), so the two codes of a 4-bit byte are the tile's
last axis (unpacked by shifts, packed by a sum of disjoint nibbles: no reshape), and the block maxima
are reductions over the last two axes.  A launch whose rows are all
shorter than ``B`` uses a narrower tile (``2 * HALF`` the next power of two of its longest row):
every block is then a whole row.  A program owns its blocks' codes, bytes and scales outright
(blocks start at even columns, ``B`` is even), so it reads the old codes and writes the new ones in
place without a race.

*The dither* is the 32-bit hash of :func:`.codec.dither` in ``uint32`` arithmetic (every operation
mod ``2**32``, which is how the hash is defined) of ``(seed + j) mod 2**32``, ``j`` the element's
row-major index in its tensor and ``seed = ((t mod 2**31) * 0x9E3779B9 + offset) mod 2**32`` for the
tensor's step ``t`` and dither offset: computed on the host, or (``DEVICE_T``) here from the device
step count, ``t = int(count + 1)`` as :meth:`.contract.LambBatch.step_counts` gives it.

*The table.*  One int64 row of :data:`ROW` entries per tensor (float64 values in the same buffer,
read through a float64 view ``num``): the addresses (weight ``p``, compensation, master, gradient,
mean codes, var codes, mean scales, var scales, output, step count; a column the mode has no use
for holds the weight's address and is never read), the geometry (numel, rows, ``L``, blocks a row,
code bytes a row, host seed, dither offset), the scalar row (rescale, clip, beta1, beta2, 1-beta1,
1-beta2, eps, wd; clip -1: off) and the bias row (bias1, bias2, 1/bias1, 1/bias2; bias1 = 0: no
correction), as in :mod:`.triton_kernels`.  A capturable step (``DEVICE_T``) reads its bias row from
the device table at ``min(count + 1, last_row)`` and masks every store with the device skip flag.

Storage kinds as in :mod:`.triton_kernels` (bfloat16 as int16 bit patterns, so that the kernels also
run under ``TRITON_INTERPRET=1``).  Non-finite moments give codes the reference leaves
implementation-defined (a NaN cast to an integer); the optimizer never stores them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _direction, _load, _new_moments, _pointer, _round, _store, divide_by_constant, \
    divide_in_float64

# how phase 2 writes the new weight ``new`` (a launch-wide constexpr), as :mod:`.fused_cpu_lean_kernels`
PLAIN = 0  # out = RN(new)            (the weight, or a separate output of its dtype)
MASTER = 1  # master = new; out = RN(new)
KAHAN = 2  # out = p = RN(new); comp = RN(new - float32(p))

# the table's columns (one row of ROW int64 entries per tensor; constexpr: the kernels read them as constants)
A_W, A_C, A_MST, A_G, A_M, A_V, A_MS, A_VS, A_O, A_CNT = map(tl.constexpr, range(10))  # addresses
G_NUMEL, G_ROWS, G_LEN, G_NB, G_HALF, G_SEED, G_OFFSET = map(tl.constexpr, range(10, 17))  # geometry, dither
S_SCAL = tl.constexpr(17)  # 8 float64: rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd
S_BIAS = tl.constexpr(25)  # 4 float64: bias1, bias2, 1/bias1, 1/bias2
ROW = tl.constexpr(29)

BLOCK = 1024  # elements per program, element-wise formats
TILE = 1024  # elements per program (NBLK * 2 * HALF), blocked formats


# ------------------------------------------------------------------ shared helpers

@triton.jit
def _address(addr_ptr, row, COL: tl.constexpr):
    return tl.load(addr_ptr + row + COL)


@triton.jit
def _bias_row(addr_ptr, num_ptr, row, bias_ptr, last_row, DEVICE_T: tl.constexpr):
    """Pointer to the tensor's (bias1, bias2, 1/bias1, 1/bias2): its table row, or (``DEVICE_T``) row
    ``min(count + 1, last_row)`` of the device bias table (:meth:`.contract.DeviceScalars.bias_rows`)."""
    if DEVICE_T:
        count = tl.load(_address(addr_ptr, row, A_CNT).to(tl.pointer_type(tl.float32)))
        return bias_ptr + 4 * tl.minimum(count.to(tl.int64) + 1, last_row)
    else:
        return num_ptr + row + S_BIAS


@triton.jit
def _seed(addr_ptr, row, DEVICE_T: tl.constexpr):
    """The dither's ``((t mod 2**31) * 0x9E3779B9 + offset) mod 2**32`` of the tensor's step ``t`` (uint32)."""
    if DEVICE_T:
        count = tl.load(_address(addr_ptr, row, A_CNT).to(tl.pointer_type(tl.float32)))
        t = ((count + 1.0).to(tl.int64) & 0x7FFFFFFF).to(tl.uint32)
        return t * 0x9E3779B9 + _address(addr_ptr, row, G_OFFSET).to(tl.uint32)
    else:
        return _address(addr_ptr, row, G_SEED).to(tl.uint32)


@triton.jit
def _dither(seed, j):
    """:func:`.codec.dither` of the elements of row-major indices ``j`` (int64): ``(x >> 8) * 2**-24`` of the
    hash of ``x = (seed + j) mod 2**32``, every operation on uint32 (mod ``2**32``)."""
    x = seed + j.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact


@triton.jit
def _keep(skip_ptr, mask, SKIP_FROM_PTR: tl.constexpr):
    """``mask`` for the stores: cleared when the device skip flag is set."""
    if SKIP_FROM_PTR:
        return mask & ((mask.to(tl.int32) * 0 + tl.load(skip_ptr).to(tl.int32)) == 0)
    else:
        return mask


@triton.jit
def _effective_weight(addr_ptr, row, offs, mask, W_KIND: tl.constexpr, MODE: tl.constexpr):
    """The weight the step decays and updates (float32): ``float32(p) + float32(c)``, the master, or ``float32(p)``."""
    if MODE == 2:
        return (_load(_pointer(addr_ptr + row + A_W, W_KIND), offs, mask, W_KIND)
                + _load(_pointer(addr_ptr + row + A_C, W_KIND), offs, mask, W_KIND))
    elif MODE == 1:
        return tl.load(_pointer(addr_ptr + row + A_MST, 0) + offs, mask=mask, other=0.0)
    else:
        return _load(_pointer(addr_ptr + row + A_W, W_KIND), offs, mask, W_KIND)


@triton.jit
def _write_weight(addr_ptr, row, offs, keep, new, W_KIND: tl.constexpr, MODE: tl.constexpr):
    """Phase 2's writes of ``new`` (float32): the output ``RN(new)``, and the master ``new`` (MASTER) or the
    compensation ``RN(new - float32(RN(new)))`` (KAHAN)."""
    _store(_pointer(addr_ptr + row + A_O, W_KIND), offs, keep, new, W_KIND)
    if MODE == 2:
        _store(_pointer(addr_ptr + row + A_C, W_KIND), offs, keep, new - _round(new, W_KIND), W_KIND)
    elif MODE == 1:
        tl.store(_pointer(addr_ptr + row + A_MST, 0) + offs, new, mask=keep)


@triton.jit
def _sum_of_squares(x, mask):
    """``sum(x**2)`` in float64 over the ``mask``ed elements of a 3-d tile."""
    x = tl.where(mask, x, 0.0).to(tl.float64)
    return tl.sum(tl.sum(tl.sum(x * x, axis=2), axis=1), axis=0)


# ------------------------------------------------------------------ element-wise formats ("fp32", "bf16")

@triton.jit
def _factored_direction(m, v, w, num_ptr, row, bias_row):
    """``(m * a') / (sqrt(v) * s' + eps) + w * wd`` with ``(a', s')`` = :func:`_block_factors` of scales 1: the
    update of ``"bf16"`` moments (:func:`mplamb.kernels.reference.factored_direction`)."""
    eps = tl.load(num_ptr + row + S_SCAL + 6).to(tl.float32)
    wd = tl.load(num_ptr + row + S_SCAL + 7).to(tl.float32)
    one = tl.full([1], 1.0, tl.float32)
    am, sv = _block_factors(one, one, bias_row)
    return tl.div_rn(m * am, tl.sqrt_rn(v) * sv + eps) + w * wd


@triton.jit
def _elementwise_direction(m, v, w, num_ptr, row, bias_row, M_KIND: tl.constexpr):
    """The direction of the element-wise format whose storage kind is ``M_KIND``: bfloat16 moments take
    :func:`_factored_direction`, float32 ones the full-state :func:`.triton_kernels._direction`."""
    if M_KIND == 1:
        return _factored_direction(m, v, w, num_ptr, row, bias_row)
    else:
        return _direction(m, v, w, num_ptr, row + S_SCAL, bias_row, 0)


@triton.jit
def _elementwise_moments(addr_ptr, num_ptr, row, offs, mask, rescale_ptr, G_KIND: tl.constexpr,
                         M_KIND: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr):
    """The new moments from the stored ones and the gradient, rounded to the format (``M_KIND``)."""
    m0 = _load(_pointer(addr_ptr + row + A_M, M_KIND), offs, mask, M_KIND)
    v0 = _load(_pointer(addr_ptr + row + A_V, M_KIND), offs, mask, M_KIND)
    grad = _load(_pointer(addr_ptr + row + A_G, G_KIND), offs, mask, G_KIND)
    m, v = _new_moments(grad, m0, v0, num_ptr + row + S_SCAL, rescale_ptr, RESCALE_FROM_PTR)
    return _round(m, M_KIND), _round(v, M_KIND)


@triton.jit
def _elements(pid, t, row, first_ptr, addr_ptr, BLOCK: tl.constexpr):
    """(offsets, mask) of program ``pid``'s chunk of tensor ``t`` (table row ``row``)."""
    offs = (pid - tl.load(first_ptr + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < _address(addr_ptr, row, G_NUMEL)


@triton.jit
def phase1_elementwise_kernel(addr_ptr, num_ptr, tid_ptr, first_ptr, rescale_ptr, partial_ptr, bias_ptr, last_row,
                              skip_ptr, W_KIND: tl.constexpr, G_KIND: tl.constexpr, M_KIND: tl.constexpr,
                              MODE: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr, WRITE: tl.constexpr,
                              DEVICE_T: tl.constexpr, SKIP_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: the new moments rounded to the format (stored when WRITE), partial sums of w**2, g**2 and
    (not WRITE) grad**2."""
    pid = tl.program_id(0)
    t = tl.load(tid_ptr + pid)
    row = t.to(tl.int64) * ROW
    offs, mask = _elements(pid, t, row, first_ptr, addr_ptr, BLOCK)
    m, v = _elementwise_moments(addr_ptr, num_ptr, row, offs, mask, rescale_ptr, G_KIND, M_KIND, RESCALE_FROM_PTR)
    if WRITE:
        keep = _keep(skip_ptr, mask, SKIP_FROM_PTR)
        _store(_pointer(addr_ptr + row + A_M, M_KIND), offs, keep, m, M_KIND)
        _store(_pointer(addr_ptr + row + A_V, M_KIND), offs, keep, v, M_KIND)
        tl.store(partial_ptr + 3 * pid + 2, 0.0)
    else:
        raw = tl.where(mask, _load(_pointer(addr_ptr + row + A_G, G_KIND), offs, mask, G_KIND), 0.0).to(tl.float64)
        tl.store(partial_ptr + 3 * pid + 2, tl.sum(raw * raw, axis=0))
    w = _effective_weight(addr_ptr, row, offs, mask, W_KIND, MODE)
    bias_row = _bias_row(addr_ptr, num_ptr, row, bias_ptr, last_row, DEVICE_T)
    g = tl.where(mask, _elementwise_direction(m, v, w, num_ptr, row, bias_row, M_KIND), 0.0).to(tl.float64)
    w64 = tl.where(mask, w, 0.0).to(tl.float64)
    tl.store(partial_ptr + 3 * pid, tl.sum(w64 * w64, axis=0))
    tl.store(partial_ptr + 3 * pid + 1, tl.sum(g * g, axis=0))


@triton.jit
def phase2_elementwise_kernel(addr_ptr, num_ptr, tid_ptr, first_ptr, rescale_ptr, steps_ptr, bias_ptr, last_row,
                              skip_ptr, W_KIND: tl.constexpr, G_KIND: tl.constexpr, M_KIND: tl.constexpr,
                              MODE: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr, RECOMPUTE: tl.constexpr,
                              DEVICE_T: tl.constexpr, SKIP_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: ``new = w - step * g`` from the stored moments, or (RECOMPUTE, after a dry phase 1) from
    the moments recomputed from the old ones and stored; the weights written as MODE says."""
    pid = tl.program_id(0)
    t = tl.load(tid_ptr + pid)
    row = t.to(tl.int64) * ROW
    offs, mask = _elements(pid, t, row, first_ptr, addr_ptr, BLOCK)
    keep = _keep(skip_ptr, mask, SKIP_FROM_PTR)
    if RECOMPUTE:
        m, v = _elementwise_moments(addr_ptr, num_ptr, row, offs, mask, rescale_ptr, G_KIND, M_KIND,
                                    RESCALE_FROM_PTR)
        _store(_pointer(addr_ptr + row + A_M, M_KIND), offs, keep, m, M_KIND)
        _store(_pointer(addr_ptr + row + A_V, M_KIND), offs, keep, v, M_KIND)
    else:
        m = _load(_pointer(addr_ptr + row + A_M, M_KIND), offs, mask, M_KIND)
        v = tl.where(mask, _load(_pointer(addr_ptr + row + A_V, M_KIND), offs, mask, M_KIND), 1.0)
    w = _effective_weight(addr_ptr, row, offs, mask, W_KIND, MODE)
    bias_row = _bias_row(addr_ptr, num_ptr, row, bias_ptr, last_row, DEVICE_T)
    step = tl.load(steps_ptr + t).to(tl.float32)
    new = w - step * _elementwise_direction(m, v, w, num_ptr, row, bias_row, M_KIND)
    _write_weight(addr_ptr, row, offs, keep, new, W_KIND, MODE)


# ------------------------------------------------------------------ blocked formats ("8bit", "4bit")

@triton.jit
def _tile(pid, t, row, first_ptr, addr_ptr, B: tl.constexpr, NBLK: tl.constexpr, HALF: tl.constexpr,
          PACKED: tl.constexpr):
    """Program ``pid``'s tile of ``NBLK`` blocks of tensor ``t`` (table row ``row``): block indices and mask
    ``[NBLK]``, element indices and mask ``[NBLK, HALF, 2]``, code-byte indices and mask ``[NBLK, HALF]``,
    the nibble shifts ``[1, 1, 2]``.  Slot ``(jj, h)`` of a block of ``n`` elements from column ``col`` is
    column ``col + 2 * jj + h`` (8-bit), or for 4 bits the code in nibble ``h`` of the block's byte ``jj``:
    column ``col + jj + h * ceil(n / 2)`` (:mod:`.codec`'s layout)."""
    length = _address(addr_ptr, row, G_LEN)
    nb = _address(addr_ptr, row, G_NB)
    bi = (pid - tl.load(first_ptr + t)).to(tl.int64) * NBLK + tl.arange(0, NBLK)
    bmask = bi < _address(addr_ptr, row, G_ROWS) * nb
    r = bi // nb
    col0 = (bi - r * nb) * B  # [NBLK]: the blocks' first columns (even)
    jj = tl.arange(0, HALF)[None, :]
    h = tl.arange(0, 2)[None, None, :]
    if PACKED:
        n = tl.minimum(length - col0, B)[:, None]
        hn = (n + 1) // 2  # [NBLK, 1]: the block's bytes
        offset = jj[:, :, None] + h * hn[:, :, None]
        emask = bmask[:, None, None] & (jj < hn)[:, :, None] & (offset < n[:, :, None])
        byte_mask = bmask[:, None] & (jj < hn)
    else:
        offset = 2 * jj[:, :, None] + h
        emask = bmask[:, None, None] & (col0[:, None, None] + offset < length)
        byte_mask = bmask[:, None] & (col0[:, None] + 2 * jj < length)
    e = r[:, None, None] * length + col0[:, None, None] + offset
    byte = r[:, None] * _address(addr_ptr, row, G_HALF) + col0[:, None] // 2 + jj
    return bi, bmask, e, emask, byte, byte_mask, 4 * h


@triton.jit
def _codes(addr_ptr, row, e, emask, byte, byte_mask, shift, PACKED: tl.constexpr):
    """The stored integer codes ``(q_m, q_v)`` of the tile (int32; 4-bit ones unpacked, ``m``'s sign-extended)."""
    if PACKED:
        bm = tl.load(_address(addr_ptr, row, A_M).to(tl.pointer_type(tl.uint8)) + byte, mask=byte_mask, other=0)
        bv = tl.load(_address(addr_ptr, row, A_V).to(tl.pointer_type(tl.uint8)) + byte, mask=byte_mask, other=0)
        qm = (bm.to(tl.int32)[:, :, None] >> shift) & 15
        return (qm ^ 8) - 8, (bv.to(tl.int32)[:, :, None] >> shift) & 15
    else:
        qm = tl.load(_address(addr_ptr, row, A_M).to(tl.pointer_type(tl.int8)) + e, mask=emask, other=0)
        qv = tl.load(_address(addr_ptr, row, A_V).to(tl.pointer_type(tl.uint8)) + e, mask=emask, other=0)
        return qm.to(tl.int32), qv.to(tl.int32)


@triton.jit
def _put_codes(addr_ptr, row, qm, qv, e, keep, byte, byte_keep, shift, PACKED: tl.constexpr):
    """Store the tile's codes (4-bit: two a byte, slot ``(jj, h)`` in nibble ``h`` of byte ``jj``; out-of-range
    elements must hold code 0, the reference's padding nibble)."""
    if PACKED:
        bm = tl.sum((qm & 15) << shift, axis=2)  # disjoint nibbles: the sum is their OR
        bv = tl.sum((qv & 15) << shift, axis=2)
        tl.store(_address(addr_ptr, row, A_M).to(tl.pointer_type(tl.uint8)) + byte, bm.to(tl.uint8), mask=byte_keep)
        tl.store(_address(addr_ptr, row, A_V).to(tl.pointer_type(tl.uint8)) + byte, bv.to(tl.uint8), mask=byte_keep)
    else:
        tl.store(_address(addr_ptr, row, A_M).to(tl.pointer_type(tl.int8)) + e, qm.to(tl.int8), mask=keep)
        tl.store(_address(addr_ptr, row, A_V).to(tl.pointer_type(tl.uint8)) + e, qv.to(tl.uint8), mask=keep)


@triton.jit
def _put_state(addr_ptr, row, qm, qv, a, b, bi, bmask, e, emask, byte, byte_mask, shift, skip_ptr,
               PACKED: tl.constexpr, SKIP_FROM_PTR: tl.constexpr):
    """Store the tile's new codes (:func:`_put_codes`) and block scales ``a``/``b``, unless the device skip flag
    is set."""
    _put_codes(addr_ptr, row, qm, qv, e, _keep(skip_ptr, emask, SKIP_FROM_PTR), byte,
               _keep(skip_ptr, byte_mask, SKIP_FROM_PTR), shift, PACKED)
    keep_b = _keep(skip_ptr, bmask, SKIP_FROM_PTR)
    tl.store(_pointer(addr_ptr + row + A_MS, 0) + bi, a, mask=keep_b)
    tl.store(_pointer(addr_ptr + row + A_VS, 0) + bi, b, mask=keep_b)


@triton.jit
def _block_max(x):
    """``max |x|`` per block (``[NBLK]``) as the largest magnitude bit pattern (they order like the values; NaN
    above inf, so a NaN sticks as in ``torch.amax``); masked elements must hold 0."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(tl.max(bits, axis=2), axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _reciprocal(a):
    """``1/a`` in float32, 0 where ``a`` is not positive (the codec's ``_reciprocal``)."""
    return tl.where(a > 0, tl.div_rn(tl.full(a.shape, 1.0, tl.float32), tl.where(a > 0, a, 1.0)), 0.0)


@triton.jit
def _block_factors(a, b, bias_row):
    """``(a', s')`` per block: ``RN32(float64(a) / bias1)`` and ``sqrt(RN32(b / bias2))`` (bias1 = 0: ``a`` and
    ``sqrt(b)``)."""
    bias1 = tl.load(bias_row)
    if bias1 != 0.0:
        a = divide_in_float64(a, bias1, tl.load(bias_row + 2))
        b = divide_by_constant(b, tl.load(bias_row + 3))
    return a, tl.sqrt_rn(b)


@triton.jit
def _blocked_direction(qm, qv, a, b, w, num_ptr, row, bias_row, inv_n, inv_k):
    """``((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd`` of the codes ``qm``/``qv`` of blocks with
    scales ``a``/``b`` (:func:`mplamb.kernels.reference.blocked_direction`)."""
    eps = tl.load(num_ptr + row + S_SCAL + 6).to(tl.float32)
    wd = tl.load(num_ptr + row + S_SCAL + 7).to(tl.float32)
    am, sb = _block_factors(a, b, bias_row)
    tm = qm.to(tl.float32) * inv_n
    tv = (qv.to(tl.float32) + 1.0) * inv_k
    return tl.div_rn((tm * tl.abs(tm)) * am[:, None, None], (tv * tv) * sb[:, None, None] + eps) + w * wd


@triton.jit
def _blocked_update(addr_ptr, num_ptr, row, bi, bmask, e, emask, byte, byte_mask, shift, rescale_ptr, seed,
                    inv_n, inv_k, n_levels, k_levels, G_KIND: tl.constexpr, PACKED: tl.constexpr,
                    RESCALE_FROM_PTR: tl.constexpr):
    """The tile's new codes and scales ``(q_m, q_v, a, b)`` from the stored ones and the gradient
    (out-of-range elements: code 0)."""
    qm0, qv0 = _codes(addr_ptr, row, e, emask, byte, byte_mask, shift, PACKED)
    a0 = tl.load(_pointer(addr_ptr + row + A_MS, 0) + bi, mask=bmask, other=0.0)[:, None, None]
    b0 = tl.load(_pointer(addr_ptr + row + A_VS, 0) + bi, mask=bmask, other=0.0)[:, None, None]
    tm = qm0.to(tl.float32) * inv_n
    tv = (qv0.to(tl.float32) + 1.0) * inv_k
    tv = tv * tv
    grad = _load(_pointer(addr_ptr + row + A_G, G_KIND), e, emask, G_KIND)
    m, v = _new_moments(grad, (tm * tl.abs(tm)) * a0, (tv * tv) * b0, num_ptr + row + S_SCAL, rescale_ptr,
                        RESCALE_FROM_PTR)
    m = tl.where(emask, m, 0.0)
    v = tl.where(emask, v, 0.0)
    a = _block_max(m)
    b = _block_max(v)
    k = tl.floor(tl.sqrt_rn(tl.abs(m) * _reciprocal(a)[:, None, None]) * n_levels + 0.5)
    k = tl.minimum(k, n_levels)
    qm = tl.where(m < 0, -k, k).to(tl.int32)
    d = _dither(seed, e)
    k = tl.floor(tl.sqrt_rn(tl.sqrt_rn(v * _reciprocal(b)[:, None, None])) * k_levels + d) - 1.0
    qv = tl.minimum(tl.maximum(k, 0.0), k_levels - 1.0).to(tl.int32)
    return tl.where(emask, qm, 0), tl.where(emask, qv, 0), a, b


@triton.jit
def phase1_blocked_kernel(addr_ptr, num_ptr, tid_ptr, first_ptr, rescale_ptr, partial_ptr, bias_ptr, last_row,
                          skip_ptr, inv_n, inv_k, n_levels, k_levels, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
                          MODE: tl.constexpr, PACKED: tl.constexpr, B: tl.constexpr, NBLK: tl.constexpr,
                          HALF: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr, WRITE: tl.constexpr,
                          DEVICE_T: tl.constexpr, SKIP_FROM_PTR: tl.constexpr):
    """Per tile of blocks: the new codes and scales (stored when WRITE), partial sums of w**2, g**2 and
    (not WRITE) grad**2.  ``inv_n``/``inv_k`` = RN32(1/N), 1/K; ``n_levels``/``k_levels`` = N, K (float32)."""
    pid = tl.program_id(0)
    t = tl.load(tid_ptr + pid)
    row = t.to(tl.int64) * ROW
    bi, bmask, e, emask, byte, byte_mask, shift = _tile(pid, t, row, first_ptr, addr_ptr, B, NBLK, HALF, PACKED)
    seed = _seed(addr_ptr, row, DEVICE_T)
    qm, qv, a, b = _blocked_update(addr_ptr, num_ptr, row, bi, bmask, e, emask, byte, byte_mask, shift, rescale_ptr,
                                   seed, inv_n, inv_k, n_levels, k_levels, G_KIND, PACKED, RESCALE_FROM_PTR)
    if WRITE:
        _put_state(addr_ptr, row, qm, qv, a, b, bi, bmask, e, emask, byte, byte_mask, shift, skip_ptr, PACKED,
                   SKIP_FROM_PTR)
        tl.store(partial_ptr + 3 * pid + 2, 0.0)
    else:
        grad = _load(_pointer(addr_ptr + row + A_G, G_KIND), e, emask, G_KIND)
        tl.store(partial_ptr + 3 * pid + 2, _sum_of_squares(grad, emask))
    w = _effective_weight(addr_ptr, row, e, emask, W_KIND, MODE)
    bias_row = _bias_row(addr_ptr, num_ptr, row, bias_ptr, last_row, DEVICE_T)
    g = _blocked_direction(qm, qv, a, b, w, num_ptr, row, bias_row, inv_n, inv_k)
    tl.store(partial_ptr + 3 * pid, _sum_of_squares(w, emask))
    tl.store(partial_ptr + 3 * pid + 1, _sum_of_squares(g, emask))


@triton.jit
def phase2_blocked_kernel(addr_ptr, num_ptr, tid_ptr, first_ptr, rescale_ptr, steps_ptr, bias_ptr, last_row,
                          skip_ptr, inv_n, inv_k, n_levels, k_levels, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
                          MODE: tl.constexpr, PACKED: tl.constexpr, B: tl.constexpr, NBLK: tl.constexpr,
                          HALF: tl.constexpr, RESCALE_FROM_PTR: tl.constexpr, RECOMPUTE: tl.constexpr,
                          DEVICE_T: tl.constexpr, SKIP_FROM_PTR: tl.constexpr):
    """Per tile of blocks: ``new = w - step * g`` from the stored codes and scales, or (RECOMPUTE, after a dry
    phase 1) from phase 1's update of the old ones, stored; the weights written as MODE says."""
    pid = tl.program_id(0)
    t = tl.load(tid_ptr + pid)
    row = t.to(tl.int64) * ROW
    bi, bmask, e, emask, byte, byte_mask, shift = _tile(pid, t, row, first_ptr, addr_ptr, B, NBLK, HALF, PACKED)
    keep = _keep(skip_ptr, emask, SKIP_FROM_PTR)
    if RECOMPUTE:
        seed = _seed(addr_ptr, row, DEVICE_T)
        qm, qv, a, b = _blocked_update(addr_ptr, num_ptr, row, bi, bmask, e, emask, byte, byte_mask, shift,
                                       rescale_ptr, seed, inv_n, inv_k, n_levels, k_levels, G_KIND, PACKED,
                                       RESCALE_FROM_PTR)
        _put_state(addr_ptr, row, qm, qv, a, b, bi, bmask, e, emask, byte, byte_mask, shift, skip_ptr, PACKED,
                   SKIP_FROM_PTR)
    else:
        qm, qv = _codes(addr_ptr, row, e, emask, byte, byte_mask, shift, PACKED)
        a = tl.load(_pointer(addr_ptr + row + A_MS, 0) + bi, mask=bmask, other=0.0)
        b = tl.load(_pointer(addr_ptr + row + A_VS, 0) + bi, mask=bmask, other=0.0)
    w = _effective_weight(addr_ptr, row, e, emask, W_KIND, MODE)
    bias_row = _bias_row(addr_ptr, num_ptr, row, bias_ptr, last_row, DEVICE_T)
    step = tl.load(steps_ptr + t).to(tl.float32)
    new = w - step * _blocked_direction(qm, qv, a, b, w, num_ptr, row, bias_row, inv_n, inv_k)
    _write_weight(addr_ptr, row, e, keep, new, W_KIND, MODE)
