"""In-cache cost of the fused CPU lean kernels' work items, per element, on one thread.

Run: ``python benchmarks/lean_stages.py [--rows 32] [--length 768] [--repeats 300]``.
Times the per-item stages of :mod:`mplamb.kernels.fused_cpu_lean_kernels` on one work item of
``rows`` rows of ``length`` (BERT's hidden size by default: 24,576 elements, bf16 weights with a
Kahan compensation), whose data stay in the L2 cache, so the figures are the kernels' arithmetic
and not the memory system's: for the blocked formats phase 1 (``update_item``: decode, moments,
encode, update from the codes; codes and scales written) and phase 2 (``apply_item`` and the
rounding stores of ``store_new``), for ``bf16`` moments the element-wise chunk (``update_elements``
and ``apply_elements_kahan_inplace``).  The effective weights' and the updates' sums of squares are
timed apart (they are the same for every format), and so is the divider's share: loops of the same number of
correctly rounded float32 square roots and divisions per element as the blocked formats' phases (nothing
else), the floor that bit-identity with the reference sets.  Step count t = 10: both bias corrections apply.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit

from mplamb.kernels import codec
from mplamb.kernels import fused_cpu_kernels as FK
from mplamb.kernels import fused_cpu_lean_kernels as KL

f32 = np.float32
BETA1, BETA2, EPS, WD, LR, T = 0.9, 0.999, 1e-6, 0.01, 1e-3, 10
BIAS1, BIAS2 = 1.0 - BETA1 ** T, f32(1.0 - BETA2 ** T)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (truncated: any pattern serves for timing)."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@njit
def _update_items(reps, length, block, nb, half, g, mc, vc, ms, vs, wb, gb, mb, vb, qm, qv, lev, fmark):
    for r in range(reps):
        KL.update_item(0, g.shape[0], length, block, nb, half, g, mc, vc, ms, vs, wb, gb, mb, vb, qm, qv, 12345 + r,
                       lev, True, f32(1), f32(np.inf), f32(BETA1), f32(BETA2), f32(1 - BETA1), f32(1 - BETA2),
                       f32(EPS), f32(WD), BIAS1, BIAS2, fmark, 0, (0, 0))  # no next item


@njit
def _apply_items(reps, length, block, nb, half, mc, vc, ms, vs, w, c, new, qm, qv, lev, fmark, w_mark):
    for _ in range(reps):
        KL.apply_item(0, w.shape[0], length, block, nb, half, mc, vc, ms, vs, w, c, new, new, qm, qv, lev[2], lev[3],
                      f32(EPS), f32(WD), BIAS1, BIAS2, f32(LR), KL.KAHAN, fmark, 0, (0, 0))
        KL.store_new(new, c, w, KL.KAHAN, w_mark)


@njit
def _elementwise_phase1(reps, g, mean, var, wb, gb, mb, vb, m_mark):
    for _ in range(reps):
        KL.update_elements(g, mean, var, wb, gb, mb, vb, m_mark, True, f32(1), f32(np.inf), f32(BETA1), f32(BETA2),
                           f32(1 - BETA1), f32(1 - BETA2), f32(EPS), f32(WD), BIAS1, BIAS2, 1.0 / BIAS1,
                           1.0 / np.float64(BIAS2), True, True, True, 0, (0, 0))


@njit
def _elementwise_phase2(reps, w, c, mean, var, w_mark):
    for _ in range(reps):
        KL.apply_elements_kahan_inplace(w, c, mean, var, 0, w.shape[0], f32(LR), f32(EPS), f32(WD), BIAS1, BIAS2,
                                        1.0 / BIAS1, 1.0 / np.float64(BIAS2), True, True, True, w_mark)


@njit(error_model="numpy")
def _divider_phase1(reps, x, y, out):
    """Three correctly rounded square roots and one division per element: the divider's work in phase 1 of the
    blocked formats (``sqrt`` to encode ``m``, two for ``v``'s fourth root, the update's division)."""
    FK.wide_vectors()
    for _ in range(reps):
        for j in range(x.shape[0]):
            out[j] = (np.sqrt(x[j]) + np.sqrt(np.sqrt(y[j]))) / (y[j] + f32(EPS))


@njit(error_model="numpy")
def _divider_phase2(reps, x, y, out):
    """One correctly rounded division per element: the divider's work in phase 2 of the blocked formats."""
    FK.wide_vectors()
    for _ in range(reps):
        for j in range(x.shape[0]):
            out[j] = x[j] / (y[j] + f32(EPS))


@njit
def _sums(reps, w, c, mst, wb, gb):
    acc = 0.0
    for _ in range(reps):
        acc += KL.effective_weights_sumsq(w, c, mst, wb, KL.KAHAN) + FK.sum_of_squares(gb)
    return acc


def per_element(fn, args, reps: int, n: int, batches: int = 5) -> float:
    """Nanoseconds per element of ``fn``'s work after one warm-up call (compilation): the fastest of
    ``batches`` timings of ``fn(reps // batches, *args)`` (the least disturbed by the machine's other work)."""
    fn(1, *args)
    per = max(1, reps // batches)
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        fn(per, *args)
        best = min(best, time.perf_counter() - start)
    return best / per / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    rows, length, reps = args.rows, args.length, args.repeats
    n = rows * length
    rng = np.random.default_rng(0)
    g = bf16_bits(rng.standard_normal(n) * 1e-3)
    w = bf16_bits(rng.standard_normal(n) * 0.02)
    c = np.zeros(n, np.uint16)
    wb, gb, mb, vb = (np.zeros(n, np.float32) for _ in range(4))
    wb[:] = rng.standard_normal(n) * 0.02
    mark = np.uint16(0)
    print(f"one work item of {rows} x {length} = {n:,} elements, bf16 weights with Kahan compensation, "
          f"one thread, {reps} repeats in 5 batches (ns per element, fastest batch)")
    print(f"  sums of squares (w, u; every format)  {per_element(_sums, (w, c, wb, wb, gb), reps, n):.3f}")
    x, y = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    print(f"  the divider alone: 3 square roots + 1 division {per_element(_divider_phase1, (x, y, mb), reps, n):.3f}"
          f"   1 division {per_element(_divider_phase2, (x, y, mb), reps, n):.3f}")
    for fmt in ("8bit", "4bit"):
        block = codec.BLOCK[fmt]
        nb, half = -(-length // block), (length + 1) // 2
        csize = rows * half if fmt == "4bit" else n
        mc = rng.integers(0, 256, csize).astype(np.uint8 if fmt == "4bit" else np.int8)
        vc = rng.integers(0, 256, csize).astype(np.uint8)
        ms = (rng.random(rows * nb) * 1e-3).astype(np.float32)
        vs = (rng.random(rows * nb) * 1e-6).astype(np.float32)
        lev = np.array([codec.MEAN_LEVELS[fmt], codec.VAR_LEVELS[fmt], 1.0 / codec.MEAN_LEVELS[fmt],
                        1.0 / codec.VAR_LEVELS[fmt]], np.float32)
        fmark = np.uint8(0) if fmt == "4bit" else np.int8(0)
        qm, qv = np.zeros(block, np.int32), np.zeros(block, np.int32)
        p1 = per_element(_update_items, (length, block, nb, half, g, mc, vc, ms, vs, wb, gb, mb, vb, qm, qv, lev,
                                         fmark), reps, n)
        p2 = per_element(_apply_items, (length, block, nb, half, mc, vc, ms, vs, w.copy(), c.copy(), mb, qm, qv, lev,
                                        fmark, mark), reps, n)
        print(f"  {fmt:5s} phase 1 (update_item) {p1:.3f}   phase 2 (apply_item + store_new) {p2:.3f}")
    mean, var = bf16_bits(rng.standard_normal(n) * 1e-4), bf16_bits(rng.random(n) * 1e-6)
    p1 = per_element(_elementwise_phase1, (g, mean, var, wb, gb, mb, vb, mark), reps, n)
    p2 = per_element(_elementwise_phase2, (w.copy(), c.copy(), mean, var, mark), reps, n)
    print(f"  bf16  phase 1 (update_elements) {p1:.3f}   phase 2 (apply_elements_kahan_inplace) {p2:.3f}")


if __name__ == "__main__":
    main()
