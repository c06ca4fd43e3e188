"""Where a fused_cpu step spends its time: the gradient-norm pass, phase 1 and phase 2, timed apart.

Run: ``python benchmarks/pass_times.py [--dtype float32|bfloat16|float16] [--numel 5e7] [--steps 8] [--start-step 1]``.
Wraps the numba kernels of :mod:`mplamb.kernels.fused_cpu` with timers around a real
``mplamb.Lamb`` step on one tensor and prints the fastest time of each pass over ``--steps``
steps, with its bytes per parameter and effective bandwidth.  ``--start-step`` sets the step count the
timed steps start from: the bias divisors round to exactly 1 from t = 356 (mean, beta1 = 0.9) and
t = 17,321 (var, beta2 = 0.999), and the kernels skip those divisions.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch

import mplamb
from mplamb.kernels import fused_cpu

# bytes per parameter each pass moves: (float32 params, bf16/fp16 params with fp32 masters)
BYTES = {"grad_sumsq_pass": (4, 2), "phase1_pass": (24, 22), "phase2_inplace_pass": (16, 16),
         "phase2_master_pass": (18, 18)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--numel", type=float, default=5e7)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--start-step", type=int, default=1, help="step count t of the first timed step")
    args = parser.parse_args()
    dtype, n = getattr(torch, args.dtype), int(args.numel)
    if not fused_cpu.AVAILABLE:
        raise SystemExit("fused_cpu needs numba (pip install 'mplamb[fast]')")

    times: Dict[str, List[float]] = {}
    for name in BYTES:
        kernel = getattr(fused_cpu.K, name)

        def timed(*a, _kernel=kernel, _name=name):
            start = time.perf_counter()
            out = _kernel(*a)
            times.setdefault(_name, []).append(time.perf_counter() - start)
            return out

        setattr(fused_cpu.K, name, timed)

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    p.grad = (torch.randn(n) * 1e-2).to(dtype)
    opt = mplamb.Lamb([p], lr=1e-3, weight_decay=0.01, backend="fused_cpu")
    for _ in range(2):  # compile / warm up
        opt.step()
    opt.state[p]["step"] = max(args.start_step - 1, opt.state[p]["step"])
    times.clear()
    total = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.step()
        total.append(time.perf_counter() - start)
    col = 0 if dtype == torch.float32 else 1
    print(f"{n:,} {args.dtype} parameters, fastest of {args.steps} steps from t = {opt.state[p]['step'] - args.steps + 1};"
          f" whole step {min(total) * 1e3:.1f} ms")
    for name, ts in times.items():
        b = BYTES[name][col]
        print(f"  {name:20s} {min(ts) * 1e3:7.1f} ms  {b:2d} B/param  {b * n / min(ts) / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
