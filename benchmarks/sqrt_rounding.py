"""How often torch's CPU ``torch.sqrt`` is not correctly rounded, and what that does to phase 1.

Run: ``python benchmarks/sqrt_rounding.py``.  Compares ``torch.sqrt`` with numpy's hardware square
root (correctly rounded) on 10^6 random values of every magnitude, in float32 and float64, and
counts the phase-1 directions (``mean_hat / (sqrt(var_hat) + eps) + wd * w``, float32, random
moments) that change when ``torch.sqrt`` replaces :func:`mplamb.kernels._ieee.ieee_sqrt`.
"""
from __future__ import annotations

import numpy as np
import torch

from mplamb._scalars import phase1_scalars
from mplamb.kernels import _ieee, reference

N = 1_000_000


def main() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = (rng.random(N) * 10.0 ** rng.integers(-30, 30, N)).astype(dtype)
        off = np.mean(torch.sqrt(torch.from_numpy(x)).numpy() != np.sqrt(x))
        print(f"{np.dtype(dtype).name}: torch.sqrt differs from the correctly rounded square root on {off:.1%} "
              f"of {N:,} values")

    g = torch.Generator().manual_seed(0)
    m, w = torch.randn(N, generator=g) * 1e-3, torch.randn(N, generator=g)
    v = torch.rand(N, generator=g) * 1e-6
    sc = phase1_scalars(t=10, wd=0.01, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                        rescale_grad=1.0, clip_gradient=-1.0, dtype=torch.float32)
    exact = reference.direction(m, v, w, sc)
    saved = reference.ieee_sqrt
    try:
        reference.ieee_sqrt = torch.sqrt  # what the reference would compute with torch's square root
        plain = reference.direction(m, v, w, sc)
    finally:
        reference.ieee_sqrt = saved
    assert saved is _ieee.ieee_sqrt
    print(f"float32 phase-1 directions that change with torch.sqrt: {(plain != exact).double().mean().item():.1%} "
          f"of {N:,}")


if __name__ == "__main__":
    main()
