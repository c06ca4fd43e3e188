"""How long a GPU would wait for the host inside a step: the host time from the optimizer's skip
decision (its one host synchronisation of a step) to the launch of the phase-1 kernel.

Run: ``python benchmarks/host_gap.py [--workload bert-large] [--dtype bfloat16] [--steps 12]``.

On a GPU, everything the host does between those two points leaves the device idle: the
synchronisation has drained its queue and phase 1 is not yet enqueued.  This measures that host
work on the CPU, with the Triton backend's kernels run by Triton's interpreter
(``TRITON_INTERPRET=1``, set here) and timed out: only the host's own Python and table work
between the two points counts.  The tensors have the workload's count and 64 elements each (the
host work per tensor does not depend on its size; the interpreter's kernel time does).  Medians
over ``--steps`` steps after two warm-up steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import torch  # noqa: E402

import mplamb  # noqa: E402
from mplamb import optimizer as optimizer_module  # noqa: E402
from mplamb.bench.workloads import WORKLOADS  # noqa: E402
from mplamb.kernels import triton_gpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="bert-large", choices=sorted(WORKLOADS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if not triton_gpu.AVAILABLE:
        raise SystemExit("needs triton (pip install 'mplamb[gpu]')")

    marks = {}
    real_skip, real_kernel = optimizer_module.Lamb._skip, triton_gpu.K.phase1_kernel

    def skip(self, bad, grad_norm):
        out = real_skip(self, bad, grad_norm)
        marks["decided"] = time.perf_counter()
        return out

    class Kernel:
        def __getitem__(self, grid):
            marks.setdefault("launched", time.perf_counter())
            return real_kernel[grid]

    optimizer_module.Lamb._skip = skip
    triton_gpu.K.phase1_kernel = Kernel()

    dtype = getattr(torch, args.dtype)
    n_tensors = len(WORKLOADS[args.workload]())
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64).to(dtype)) for _ in range(n_tensors)]
    opt = mplamb.Lamb(params, lr=1e-3, weight_decay=0.01, backend="triton")
    gaps = []
    for step in range(args.steps + 2):
        for p in params:
            p.grad = torch.randn(64).to(dtype)
        marks.clear()
        opt.step()
        if step >= 2:
            gaps.append(marks["launched"] - marks["decided"])
    print(f"{args.workload}: {n_tensors} {args.dtype} tensors, host time from the skip decision to the phase-1 "
          f"launch: median {statistics.median(gaps) * 1e3:.3f} ms (min {min(gaps) * 1e3:.3f}, max "
          f"{max(gaps) * 1e3:.3f}) over {len(gaps)} steps")


if __name__ == "__main__":
    main()
