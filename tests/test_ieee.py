"""ieee_sqrt is correctly rounded where torch 2.13's CPU torch.sqrt is not."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mplamb.kernels._ieee import ieee_sqrt


def _values(dtype, n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(n) * 10.0 ** rng.integers(-30, 30, n)
    return torch.from_numpy(x).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ieee_sqrt_is_correctly_rounded(dtype):
    x = _values(dtype)
    expected = np.sqrt(x.numpy())  # the hardware instruction: correctly rounded
    assert np.array_equal(ieee_sqrt(x).numpy(), expected)
    # spot-check the oracle itself against Python's correctly rounded math.sqrt
    for v in x[:50].double().tolist():
        assert float(np.sqrt(np.float64(v))) == math.sqrt(v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ieee_sqrt_half(dtype):
    x = _values(torch.float32, 10_000).clamp(1e-4, 1e4).to(dtype)
    expected = torch.from_numpy(np.sqrt(x.float().numpy()).astype(np.float64)).to(dtype)
    assert torch.equal(ieee_sqrt(x), expected)


def test_shapes_and_specials():
    assert ieee_sqrt(torch.tensor(4.0)).shape == ()
    assert ieee_sqrt(torch.tensor(4.0, dtype=torch.float64)).item() == 2.0
    assert ieee_sqrt(torch.empty(0, 3, dtype=torch.float64)).shape == (0, 3)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -1.0])
    out = ieee_sqrt(specials)
    assert out[0] == 0 and math.copysign(1, out[1].item()) == -1 and out[2] == float("inf")
    assert torch.isnan(out[3]) and torch.isnan(out[4])


def _all_f32_of_a_binade_slice(n, seed):
    """``n`` float32 values: random bit patterns over every exponent (normals and subnormals),
    plus zeros, infinities, NaN and the extremes."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 0x7F800000, n, dtype=np.uint32)
    specials = np.array([0, 1, 2, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x3F800000],
                        dtype=np.uint32)
    bits = np.concatenate([bits, specials])
    return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


def _bias_corrections(which, betas, steps):
    """The optimizer's own divisors: ``bias1`` (float64) or ``bias2`` (a float32 value) over ``betas`` x ``steps``."""
    from mplamb._scalars import phase1_scalars

    out = set()
    for beta in betas:
        for t in steps:
            sc = phase1_scalars(t=t, wd=0.0, beta1=beta, beta2=beta, epsilon=1e-6, bias_correction=True,
                                rescale_grad=1.0, clip_gradient=-1.0, dtype=torch.float32)
            out.add(getattr(sc, which))
    return out


def _check_divisions(kernel, x, divisors, cast, expected_of):
    """``kernel(x, d, 1/d)`` (a numba scalar function) equals ``expected_of(x, d)`` bit for bit, NaN as NaN."""
    numba = pytest.importorskip("numba")

    @numba.njit
    def divide_all(x, d, inv, out):
        for j in range(x.shape[0]):
            out[j] = kernel(x[j], d, inv)

    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        for d in sorted(divisors):
            d = cast(d)
            divide_all(x, d, 1.0 / np.float64(d), out)
            expected = expected_of(x, d)
            same = (out.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(out) & np.isnan(expected))
            assert same.all(), f"divisor {d!r}: {x[~same][:5]}"


def test_divide_by_constant_is_float32_division_for_every_input():
    """fused_cpu divides by the bias correction ``1 - beta2**t`` as a float64 multiplication by its
    reciprocal; the lattice argument in its docstring says that equals float32 division for every
    float32 input.  Checked on 2 million inputs of every exponent against 300 divisors: the
    optimizer's own (beta2 in {0.95, 0.98, 0.99, 0.999, 0.9999}, t = 1..40 and large t) and random
    ones in (2**-24, 1]."""
    pytest.importorskip("numba")
    from mplamb.kernels.fused_cpu_kernels import divide_by_constant

    divisors = {float(np.float32(d)) for d in _bias_corrections(
        "bias2", (0.95, 0.98, 0.99, 0.999, 0.9999), list(range(1, 41)) + [100, 1000, 10_000, 100_000])}
    rng = np.random.default_rng(7)
    divisors |= set(np.float32(2.0 ** rng.uniform(-24, 0, 300 - len(divisors))).tolist())
    # numpy's float32 division is the IEEE instruction: correctly rounded, NaN payloads included
    _check_divisions(divide_by_constant, _all_f32_of_a_binade_slice(1_000_000, seed=3), divisors, np.float32,
                     lambda x, d: x / d)


def test_divide_in_float64_is_mxnets_double_division():
    """fused_cpu computes MXNet's ``float(double(mean) / bias1)`` (``bias1 = 1 - beta1**t`` in float64)
    without a division (Markstein's FMA correction of the reciprocal product).  Checked bit for bit,
    signed zeros included, on 2 million inputs of every exponent against 200 divisors: the
    optimizer's own and random float64 values in (2**-30, 1].  Infinite inputs give NaN (documented:
    the direction is NaN either way) and are excluded here."""
    pytest.importorskip("numba")
    from mplamb.kernels.fused_cpu_kernels import divide_in_float64

    divisors = _bias_corrections("bias1", (0.0, 0.5, 0.8, 0.9, 0.95, 0.99), list(range(1, 31)) + [100, 1000, 100_000])
    rng = np.random.default_rng(11)
    divisors |= set((2.0 ** rng.uniform(-30, 0, 200 - len(divisors))).tolist())
    x = _all_f32_of_a_binade_slice(1_000_000, seed=5)
    _check_divisions(divide_in_float64, x[~np.isinf(x)], divisors, float,
                     lambda x, d: (x.astype(np.float64) / d).astype(np.float32))  # MXNet: double division, then float


@pytest.mark.parametrize("which", ["mean", "var"])
def test_triton_divisions_match_the_fused_cpu_ones(which):
    """The Triton kernels' division helpers (run here by the interpreter) give the same bits as the
    checks above demand, on 2 million inputs of every exponent and a handful of divisors."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    from mplamb.kernels import triton_kernels

    globals()["TK"] = triton_kernels  # a @triton.jit function resolves names in its module's globals

    @triton.jit
    def divide_kernel(x_ptr, out_ptr, d, inv, n, MEAN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if MEAN:
            y = TK.divide_in_float64(x, d, inv)
        else:
            y = TK.divide_by_constant(x, inv)
        tl.store(out_ptr + offs, y, mask=mask)

    x = _all_f32_of_a_binade_slice(1_000_000, seed=9)
    if which == "mean":
        x = x[~np.isinf(x)]
    xt = torch.from_numpy(x.copy())
    out = torch.empty_like(xt)
    divisors = sorted(_bias_corrections("bias1" if which == "mean" else "bias2", (0.9, 0.999), [1, 2, 7, 30, 1000]))
    with np.errstate(all="ignore"):
        for d in divisors:
            divide_kernel[(-(-x.size // 65536),)](xt, out, d, 1.0 / d, x.size, MEAN=which == "mean", BLOCK=65536)
            got = out.numpy()
            expected = ((x.astype(np.float64) / d).astype(np.float32) if which == "mean"
                        else x / np.float32(d))
            same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
            assert same.all(), f"divisor {d!r}: {x[~same][:5]}"


def _f32_patterns_around_half_rounding():
    """float32 bit patterns with every upper half (every sign and exponent, every bfloat16 value and
    every float16 range) and lower halves at and around the rounding points (ties, just below and
    above, the extremes) plus a few random ones: NaN payloads, infinities and subnormals included."""
    lows = [0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, 0xEFFF, 0xF000, 0xFFFF]
    lows += np.random.default_rng(13).integers(0, 0x10000, 20).tolist()
    hi = np.arange(0x10000, dtype=np.uint32) << np.uint32(16)
    return (hi[:, None] | np.asarray(lows, dtype=np.uint32)[None, :]).ravel()


@pytest.mark.parametrize("dtype, impl", [(torch.bfloat16, "kernels"), (torch.float16, "kernels"),
                                         (torch.float16, "integer")])
def test_half_stores_and_loads_round_as_torch_does(dtype, impl):
    """fused_cpu's float32 -> bfloat16/float16 rounding (and the exact widening back) against torch's
    conversions, bit for bit but for NaN payloads, on 2 million patterns chosen around every rounding
    point: what the kernels use here ("kernels": hardware float16 conversion where the CPU has it),
    and the integer-arithmetic float16 conversion of CPUs without it."""
    pytest.importorskip("numba")
    from numba import njit

    from mplamb.kernels.fused_cpu_kernels import f16_load_soft, f16_store_soft, load, store

    marker = np.uint16(0) if dtype == torch.bfloat16 else np.int16(0)

    if impl == "kernels":
        @njit
        def stores(x, out):
            for j in range(x.shape[0]):
                out[j] = store(x[j], marker)

        @njit
        def loads(h, out):
            for j in range(h.shape[0]):
                out[j] = load(h[j])
    else:
        @njit
        def stores(x, out):
            for j in range(x.shape[0]):
                out[j] = f16_store_soft(x[j])

        @njit
        def loads(h, out):
            for j in range(h.shape[0]):
                out[j] = f16_load_soft(h[j])

    x = _f32_patterns_around_half_rounding().view(np.float32)
    out = np.empty(x.shape, dtype=marker.dtype)
    stores(x, out)
    half = torch.from_numpy(x).to(dtype)
    expected = half.view(torch.int16).numpy().view(marker.dtype)
    ours_nan = torch.from_numpy(out.view(np.int16)).view(dtype).isnan().numpy()
    # NaN stays NaN; its payload is not matched (torch 2.13 gives bfloat16 0xFFFF for every NaN)
    bad = (out != expected) & ~(ours_nan & half.isnan().numpy())
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {x.view(np.uint32)[bad][:4]}"
    halves = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(marker.dtype)
    wide = np.empty(halves.shape, dtype=np.float32)
    loads(halves, wide)
    ref = torch.from_numpy(halves.view(np.int16)).view(dtype).float().numpy()
    assert ((wide.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(wide) & np.isnan(ref))).all()


def test_float16_is_converted_in_hardware_where_the_cpu_can():
    """On x86 with F16C the kernels must use it (the integer conversion made float16 steps 1.7x slower)."""
    pytest.importorskip("numba")
    import platform

    from mplamb.kernels import fused_cpu_kernels as K

    if platform.machine() != "x86_64" or os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("checks the x86 host-CPU case")
    with open("/proc/cpuinfo") as f:
        f16c = " f16c" in f.read()
    assert K.HARDWARE_HALF is f16c
