"""Does the step count change the cost of many small tensors?  Optimizers from step 1 and from
``--late-step`` alternated in one process, medians printed.

Run: ``python benchmarks/late_step_ab.py [--dtype bfloat16|float32] [--tensors 10000] [--late-step 1000]``.
From t = 356 the fused kernels skip the mean's bias division (see ``mplamb.kernels.fused_cpu.bias_regime``);
on 10,000 tensors of 1,000 the step is dominated by per-tensor work, which should not depend on t.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mplamb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--tensors", type=int, default=10_000)
    parser.add_argument("--late-step", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    def make() -> mplamb.Lamb:
        ps = [torch.nn.Parameter(torch.randn(1000).to(dtype)) for _ in range(args.tensors)]
        for p in ps:
            p.grad = (torch.randn(1000) * 1e-3).to(dtype)
        return mplamb.Lamb(ps, lr=1e-3, weight_decay=0.01, backend="fused_cpu")

    opts = {"from 1": make(), f"from {args.late_step}": make(), "from 1 (made last)": make()}
    for name, opt in opts.items():
        opt.step()
        if name == f"from {args.late_step}":
            for st in opt.state.values():
                st["step"] = args.late_step - 1
    times = {name: [] for name in opts}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    print(f"{args.tensors} x 1000 {args.dtype} tensors, median of {args.repeats} steps:")
    for name, ts in times.items():
        print(f"  {name:20s} {statistics.median(ts) * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
