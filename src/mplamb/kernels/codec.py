"""Lean optimizer state: the storage formats of LAMB's moments, and the Kahan-compensated weight.

This module is the specification and the reference implementation (plain PyTorch) of every
lean format; the fused CPU kernels implement the same arithmetic and are tested bit-identical
to it.  ``docs/lean_state.md`` carries the specification with the measurements behind it.

Formats of the moments (``Lamb(moments=...)``)
----------------------------------------------
``"fp32"``
    float32 tensors of the parameter's shape (no encoding).
``"bf16"``
    bfloat16 tensors of the parameter's shape; encode rounds to nearest even, decode widens.
``"8bit"`` and ``"4bit"``: block-wise codes with one float32 scale per block.
    *Blocks.*  A tensor of shape ``(d0, d1, ...)`` is seen as ``d0`` rows of ``L = d1 * ...``
    elements (a 1-d tensor as one row); each row is cut into blocks of ``B`` consecutive
    elements (``B`` = 256 for 8 bits, 128 for 4 bits; the last block of a row may be shorter).
    Blocks never span rows, so a tensor sharded on dim 0 (FSDP2) holds whole blocks on every
    rank and its checkpoint reshards like the parameter.
    *First moment* (signed, ``N`` = 127 or 7): the block's scale is ``a = max |m|``; the code is
    ``q = sign(m) * floor(N * sqrt(|m| * (1/a)) + 1/2)`` (``q = 0`` where ``a = 0``), and it
    decodes to ``m = (t * |t|) * a`` with ``t = q * RN(1/N)``: square-root companding, finer near 0.
    *Second moment* (unsigned, ``K`` = 256 or 16 levels): the scale is ``b = max v``; the code is
    ``q = clamp(floor(K * sqrt(sqrt(v * (1/b))) + d) - 1, 0, K - 1)``, rounded *stochastically* with the
    dither ``d`` in ``[0, 1)`` of :func:`dither` (a hash of the element's index in the whole parameter
    and the step count: deterministic, the same in every backend, after a resume and however the
    parameter is sharded), and it decodes to
    ``v = ((t * t) * (t * t)) * b`` with ``t = (q + 1) / K``: fourth-root companding *without a
    zero*.  The smallest code decodes to ``b / K**4 > 0``, so a second moment never decodes to 0
    while its block holds a non-zero value, and an update ``m / (sqrt(v) + eps)`` cannot blow up
    where ``v`` was merely small (the "zero-point problem" of 4-bit optimizers, Li et al., 2023).
    An all-zero block (``b = 0``) decodes to zeros.  Stochastic rounding keeps ``v`` unbiased where its
    per-step change is smaller than half a code (late in training, ``beta2 = 0.999`` moves ``v`` by 0.1 %
    a step): rounded to nearest, such codes freeze relative to their block's maximum and the block drifts
    low with it, which inflates ``||u||`` and the trust ratio (``docs/lean_codec_choice.md`` measures it).
    The first moment is rounded to nearest (stochastic rounding of ``m`` measured worse).
    *Arithmetic.*  Everything in float32, each operation rounded once (no fused multiply-add),
    square roots correctly rounded; ``1/a`` and ``1/b`` are one float32 division per block.
    *Storage.*  8 bits: ``int8`` codes for ``m`` and ``uint8`` codes for ``v``, in tensors of the
    parameter's shape.  4 bits: two codes a byte, ``uint8`` tensors of shape ``(d0, ceil(L / 2))`` (a 1-d
    tensor: ``(ceil(n / 2),)``); a block of ``n`` codes (from an even column) occupies the ``h = ceil(n / 2)``
    bytes from its column's half, byte ``j`` holding code ``j`` in its low nibble and code ``h + j`` in its
    high nibble (0 past the block's end when ``n`` is odd), ``m``'s as two's complement nibbles: both
    halves of a block are contiguous in the bytes, which the kernels read with vector loads.  Scales:
    float32, ``(d0, ceil(L / B))`` (1-d: ``(ceil(n / B),)``).
    *Small tensors.*  Tensors of fewer than :data:`MIN_QUANTIZED_NUMEL` elements keep float32
    moments (biases and norms: a negligible share of the memory, and the most sensitive), as do
    float64 parameters and 1-d DTensor shards (their blocks would not follow the sharding).

Each step decodes the stored moments, updates them in float32, encodes them, and computes the
update from the *new codes*: the update LAMB measures for its trust ratio is exactly the one the
stored state gives, and the one phase 2 applies.  For the blocked formats the update
``m_hat / (sqrt(v_hat) + eps) + wd * w`` is evaluated per element as

    u = ((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd,
    a' = RN32(float64(a) / bias1),   s' = sqrt(RN32(b / bias2))        (once per block)

with ``t_m``, ``t_v`` the codes' ``t`` above (:func:`mean_unit`, :func:`var_root_unit`): the same value
up to rounding, since ``sqrt(((t * t) * (t * t)) * b) = (t * t) * sqrt(b)``, with the bias corrections
and the square root taken once per block instead of once per element (``bias1 = bias2 = 1`` without
bias correction).  The ``"bf16"`` format uses the same formula with one block of scales ``a = b = 1`` and
the decoded moments for the units::

    u = (m * a') / (sqrt(v) * s' + eps) + w * wd,
    a' = RN32(float64(1) / bias1),   s' = sqrt(RN32(1 / bias2))             (once per tensor)

so the bias corrections are two per-tensor factors instead of two divisions per element (the
full-state update's float64 division of the mean, MXNet's arithmetic, is the costliest part of it).
The ``"fp32"`` format keeps the full-state update of :func:`mplamb.kernels.reference.direction`
exactly: fp32 moments step as a full-state LAMB does, whatever the weights.

Kahan-compensated weights (``Lamb(master_weights="kahan")``)
-------------------------------------------------------------
A bfloat16/float16 parameter ``p`` keeps a compensation ``c`` of its own dtype instead of a
float32 master.  The effective weight is ``w = float32(p) + float32(c)`` (one float32 addition);
the step computes ``new = w - step * u`` in float32 and stores ``p = RN(new)`` and
``c = RN(new - float32(p))`` (the part of the update the rounded weight could not hold), so small
updates accumulate instead of being rounded away.  The trust ratio's ``||w||`` and the weight
decay use the effective weight.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._ieee import ieee_sqrt

__all__ = ["FORMATS", "BLOCKED", "FACTORED", "MIN_QUANTIZED_NUMEL", "BLOCK", "MEAN_LEVELS", "VAR_LEVELS", "storage_format",
           "rows_and_length", "code_shape", "scale_shape", "encode_mean", "decode_mean", "encode_var", "decode_var",
           "encode", "decode", "mean_unit", "var_root_unit", "scale_blocks", "dither", "code_dtype", "effective_weight", "kahan_split", "state_bytes"]

FORMATS = ("fp32", "bf16", "8bit", "4bit")
BLOCKED = ("8bit", "4bit")
FACTORED = ("bf16",)  # element-wise formats whose update takes the bias corrections as per-tensor factors
MIN_QUANTIZED_NUMEL = 4096
BLOCK = {"8bit": 256, "4bit": 128}
MEAN_LEVELS = {"8bit": 127, "4bit": 7}  # N: codes -N..N
VAR_LEVELS = {"8bit": 256, "4bit": 16}  # K: codes 0..K-1 decode to (q+1)/K


def storage_format(mode: str, shape: Sequence[int], dtype: torch.dtype, sharded: bool = False) -> str:
    """The format a parameter of ``shape``/``dtype`` gets for the group setting ``mode``: the blocked
    formats only for tensors of at least :data:`MIN_QUANTIZED_NUMEL` elements that are not float64
    (and not 1-d shards), ``"bf16"`` for every non-float64 tensor, else ``"fp32"`` (float64 stays float64)."""
    if mode == "fp32" or dtype == torch.float64:
        return "fp32"
    if mode == "bf16":
        return "bf16"
    numel = 1
    for d in shape:
        numel *= int(d)
    if numel < MIN_QUANTIZED_NUMEL or (sharded and len(shape) < 2):
        return "fp32"
    return mode


def rows_and_length(shape: Sequence[int]) -> Tuple[int, int]:
    """``(rows, L)``: dim 0 and the product of the others (a 0-d or 1-d tensor: one row)."""
    if len(shape) < 2:
        return 1, int(shape[0]) if len(shape) else 1
    length = 1
    for d in shape[1:]:
        length *= int(d)
    return int(shape[0]), length


def _lead(shape: Sequence[int], width: int) -> Tuple[int, ...]:
    return (width,) if len(shape) < 2 else (int(shape[0]), width)


def code_shape(fmt: str, shape: Sequence[int]) -> Tuple[int, ...]:
    """Shape of a moment's code tensor for a parameter of ``shape``."""
    if fmt == "4bit":
        return _lead(shape, (rows_and_length(shape)[1] + 1) // 2)
    return tuple(int(d) for d in shape)


def scale_shape(fmt: str, shape: Sequence[int]) -> Tuple[int, ...]:
    """Shape of a moment's float32 scales (one per block) for a parameter of ``shape``."""
    length = rows_and_length(shape)[1]
    return _lead(shape, -(-length // BLOCK[fmt]))


def code_dtype(fmt: str, which: str) -> torch.dtype:
    """The dtype of ``which`` (``"mean"`` or ``"var"``) codes in ``fmt``."""
    if fmt == "fp32":
        return torch.float32
    if fmt == "bf16":
        return torch.bfloat16
    if fmt == "8bit" and which == "mean":
        return torch.int8
    return torch.uint8


def _blocks(x: torch.Tensor, shape: Sequence[int], block: int) -> torch.Tensor:
    """``x`` (the parameter's shape) as ``(rows, blocks, block)`` float32, each row zero-padded."""
    rows, length = rows_and_length(shape)
    nb = -(-length // block)
    x = x.reshape(rows, length).to(torch.float32)
    if nb * block != length:
        x = torch.nn.functional.pad(x, (0, nb * block - length))
    return x.reshape(rows, nb, block)


def _as_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` as ``rows`` rows (``reshape(rows, -1)``, which cannot infer the width of 0 rows: an empty shard)."""
    return x.reshape(rows, x.numel() // rows if rows else 0)


def _unblock(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    rows, length = rows_and_length(shape)
    return _as_rows(x, rows)[:, :length].reshape(shape)


def _split(length: int) -> Tuple[int, int, int]:
    """``(full, n, h)`` of a row of ``length`` 4-bit codes: the columns in whole blocks, the elements of the
    last partial block and its bytes ``h = ceil(n / 2)``."""
    full = length // BLOCK["4bit"] * BLOCK["4bit"]
    n = length - full
    return full, n, (n + 1) // 2


def _pack(q: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """4-bit codes (integers 0..15 of the parameter's shape) two to a byte, block by block along each row: the
    ``h = ceil(n / 2)`` bytes of a block of ``n`` codes hold its first ``h`` codes in their low nibbles and the
    others in their high nibbles (zero in the last byte's high nibble when ``n`` is odd)."""
    rows, length = rows_and_length(shape)
    q = q.reshape(rows, length).to(torch.uint8)
    full, n, h = _split(length)
    half = BLOCK["4bit"] // 2
    blocks = q[:, :full].reshape(rows, full // BLOCK["4bit"], BLOCK["4bit"])
    parts = [(blocks[..., :half] | (blocks[..., half:] << 4)).reshape(rows, full // 2)]
    if n:
        tail = q[:, full:]
        parts.append(tail[:, :h] | (torch.nn.functional.pad(tail[:, h:], (0, 2 * h - n)) << 4))
    return torch.cat(parts, dim=1).reshape(code_shape("4bit", shape))


def _unpack(codes: torch.Tensor, shape: Sequence[int], signed: bool) -> torch.Tensor:
    """The 4-bit codes of :func:`_pack`'s bytes, as int32 of the parameter's shape (``signed``: two's complement)."""
    rows, length = rows_and_length(shape)
    c = _as_rows(codes, rows).to(torch.int32)
    lo, hi = c & 15, c >> 4
    full, n, h = _split(length)
    half = BLOCK["4bit"] // 2
    nblocks = full // BLOCK["4bit"]
    parts = [torch.cat([lo[:, :full // 2].reshape(rows, nblocks, half),
                        hi[:, :full // 2].reshape(rows, nblocks, half)], dim=2).reshape(rows, full)]
    if n:
        parts.append(torch.cat([lo[:, full // 2:], hi[:, full // 2:full // 2 + n - h]], dim=1))
    q = torch.cat(parts, dim=1)
    if signed:
        q = (q ^ 8) - 8
    return q.reshape(shape)


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` per block in float32, 0 where the scale is 0."""
    return torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))


def encode_mean(m: torch.Tensor, fmt: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(codes, scales)`` of the first moment ``m`` (float32, the parameter's shape)."""
    if fmt in ("fp32", "bf16"):
        return m.to(code_dtype(fmt, "mean")), None
    n = MEAN_LEVELS[fmt]
    shape = m.shape
    x = _blocks(m, shape, BLOCK[fmt])
    scale = x.abs().amax(dim=-1)
    r = x.abs() * _reciprocal(scale)[..., None]
    k = torch.clamp(torch.floor(ieee_sqrt(r) * float(n) + 0.5), max=float(n))
    q = _unblock(torch.where(x < 0, -k, k), shape)
    codes = q.to(torch.int8) if fmt == "8bit" else _pack(q.to(torch.int32) & 15, shape)
    return codes, scale.reshape(scale_shape(fmt, shape))


def mean_unit(codes: torch.Tensor, fmt: str, shape: Sequence[int]) -> torch.Tensor:
    """``t * |t|`` with ``t = q * RN(1/N)`` (float32, ``shape``): the first moment a blocked code holds,
    in units of its block's scale."""
    q = codes if fmt == "8bit" else _unpack(codes, shape, signed=True)
    t = q.to(torch.float32) * torch.tensor(1.0 / MEAN_LEVELS[fmt], dtype=torch.float32)
    return t * t.abs()


def var_root_unit(codes: torch.Tensor, fmt: str, shape: Sequence[int]) -> torch.Tensor:
    """``t * t`` with ``t = (q + 1) * (1/K)`` (float32, ``shape``): the *square root* of the second moment
    a blocked code holds, in units of the square root of its block's scale."""
    q = codes if fmt == "8bit" else _unpack(codes, shape, signed=False)
    t = (q.to(torch.float32) + 1.0) * (1.0 / VAR_LEVELS[fmt])
    return t * t


def scale_blocks(x: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (float32) times the scale of each element's block."""
    shape = x.shape
    return _unblock(_blocks(x, shape, BLOCK[fmt]) * scales.reshape(x_shape(shape, fmt)), shape)


def decode_mean(codes: torch.Tensor, scales: Optional[torch.Tensor], fmt: str,
                shape: Sequence[int]) -> torch.Tensor:
    """The first moment (float32, ``shape``) that ``codes``/``scales`` hold: ``(t * |t|) * a``."""
    if fmt in ("fp32", "bf16"):
        return codes.to(torch.float32)
    return scale_blocks(mean_unit(codes, fmt, shape), scales, fmt)


def x_shape(shape: Sequence[int], fmt: str) -> Tuple[int, int, int]:
    """``(rows, blocks, 1)``: the scales broadcast over each block."""
    rows, length = rows_and_length(shape)
    return rows, -(-length // BLOCK[fmt]), 1


_GOLDEN = 0x9E3779B9
_HASH_MUL = (0x7FEB352D, 0x846CA68B)
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves of ``c``)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def dither(numel: int, seed: "int | torch.Tensor", device: torch.device = torch.device("cpu"),
           offset: int = 0) -> torch.Tensor:
    """The stochastic-rounding offsets ``d_j`` in ``[0, 1)`` (float32) of elements ``j = offset .. offset+numel-1``.

    ``x = (j + (seed mod 2**31) * 0x9E3779B9) mod 2**32``, mixed by the 32-bit hash (every operation
    mod ``2**32``) ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``, then
    ``d = (x >> 8) * 2**-24`` (exact in float32).  ``j`` is the element's row-major index in its
    *whole* parameter (a shard of rows passes ``offset``, the index of its first element, so a sharded
    tensor draws what the whole one does), ``seed`` the parameter's step count ``t`` (an int, or a 0-d
    tensor on the device for capturable steps): a fresh, reproducible draw per element and step.
    """
    j = torch.arange(int(offset), int(offset) + numel, dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=device, dtype=torch.int64) & 0x7FFFFFFF
    else:
        s = int(seed) & 0x7FFFFFFF
    x = (j + s * _GOLDEN) & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, _HASH_MUL[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _HASH_MUL[1])
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0 ** -24)


def encode_var(v: torch.Tensor, fmt: str, seed: "int | torch.Tensor" = 0,
               offset: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(codes, scales)`` of the second moment ``v`` (float32, >= 0, the parameter's shape, or a shard of its
    rows whose first element has index ``offset`` in the whole parameter), stochastically rounded with
    :func:`dither` of ``seed`` (the step count)."""
    if fmt in ("fp32", "bf16"):
        return v.to(code_dtype(fmt, "var")), None
    k_levels = VAR_LEVELS[fmt]
    shape = v.shape
    x = _blocks(v, shape, BLOCK[fmt])
    d = _blocks(dither(v.numel(), seed, v.device, offset).reshape(shape), shape, BLOCK[fmt])
    scale = x.amax(dim=-1)
    r = x * _reciprocal(scale)[..., None]
    k = torch.floor(ieee_sqrt(ieee_sqrt(r)) * float(k_levels) + d)
    q = _unblock(torch.clamp(k - 1.0, 0.0, float(k_levels - 1)), shape)
    codes = q.to(torch.uint8) if fmt == "8bit" else _pack(q.to(torch.int32), shape)
    return codes, scale.reshape(scale_shape(fmt, shape))


def decode_var(codes: torch.Tensor, scales: Optional[torch.Tensor], fmt: str,
               shape: Sequence[int]) -> torch.Tensor:
    """The second moment (float32, ``shape``) that ``codes``/``scales`` hold: ``((t * t) * (t * t)) * b``."""
    if fmt in ("fp32", "bf16"):
        return codes.to(torch.float32)
    u = var_root_unit(codes, fmt, shape)
    return scale_blocks(u * u, scales, fmt)


def encode(which: str, x: torch.Tensor, fmt: str, seed: "int | torch.Tensor" = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`encode_mean` (``which="mean"``) or :func:`encode_var` (``"var"``, dithered by ``seed``)."""
    return encode_mean(x, fmt) if which == "mean" else encode_var(x, fmt, seed)


def decode(which: str, codes: torch.Tensor, scales: Optional[torch.Tensor], fmt: str,
           shape: Sequence[int]) -> torch.Tensor:
    """:func:`decode_mean` (``which="mean"``) or :func:`decode_var` (``"var"``)."""
    return (decode_mean if which == "mean" else decode_var)(codes, scales, fmt, shape)


def effective_weight(weight: torch.Tensor, comp: Optional[torch.Tensor]) -> torch.Tensor:
    """The weight a Kahan-compensated parameter stands for: ``float32(p) + float32(c)`` (float32);
    without a compensation, the weight in its compute dtype."""
    if comp is None:
        return weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return weight.to(torch.float32) + comp.to(torch.float32)


def kahan_split(new: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(p, c)`` of ``dtype`` for the float32 weight ``new``: ``p = RN(new)``, ``c = RN(new - float32(p))``."""
    p = new.to(dtype)
    return p, (new - p.to(torch.float32)).to(dtype)


def state_bytes(fmt: str, shape: Sequence[int]) -> int:
    """Bytes of both moments (codes and scales) of a parameter of ``shape`` stored in ``fmt``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if fmt == "fp32":
        return 8 * numel
    if fmt == "bf16":
        return 4 * numel
    codes = 1
    for d in code_shape(fmt, shape):
        codes *= d
    scales = 1
    for d in scale_shape(fmt, shape):
        scales *= d
    return 2 * codes + 8 * scales
