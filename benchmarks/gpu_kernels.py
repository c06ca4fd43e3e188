"""Kernel-level timings of the Triton backend on a GPU, against a device-to-device copy.

    python benchmarks/gpu_kernels.py [--workload bert-large] [--out gpu_kernels.json]

Times, with CUDA events (median of ``--repeats`` after warm-up), on a LambBatch of the
workload's shapes (fp32, and bf16 weights with fp32 masters): the gradient pass
(``grad_sum_of_squares``), phase 1, phase 2, and a whole ``lamb_step`` (both phases and the
step sizes between them), for several block sizes and warp counts.  Reports each as a
fraction of the copy bandwidth at the bytes it must move (phase 1 + phase 2: 40 B/param in
both setups).  The optimizer's own step (``python -m mplamb bench --device cuda``) adds the
gradient pass and one host synchronisation (the non-finite skip).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mplamb._scalars import phase1_scalars
from mplamb.bench.workloads import WORKLOADS, numel
from mplamb.kernels import LambBatch, triton_gpu

# bytes per parameter: (gradient pass, phase 1, phase 2) by setup
BYTES = {"fp32": (4, 24, 16), "bf16": (2, 22, 18)}


def make_batch(shapes, setup: str, device: torch.device) -> LambBatch:
    g = torch.Generator(device=device).manual_seed(0)
    half = setup == "bf16"
    masters = [torch.randn(s, generator=g, device=device) * 0.02 for s in shapes]
    weights = [m.to(torch.bfloat16) for m in masters] if half else masters
    grads = [(torch.randn(s, generator=g, device=device) * 1e-3).to(w.dtype) for s, w in zip(shapes, weights)]
    sc = phase1_scalars(t=3, wd=0.01, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                        rescale_grad=1.0, clip_gradient=-1.0, dtype=torch.float32)
    return LambBatch(weights=weights, grads=grads, means=[torch.zeros_like(m) for m in masters],
                     vars=[torch.zeros_like(m) for m in masters], masters=masters if half else [None] * len(shapes),
                     outs=weights, scalars=[sc] * len(shapes), lrs=[1e-3] * len(shapes), uniform=True, memo={})


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU; a plain clock on the CPU: smoke tests only)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="bert-large", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--configs", default="512x2,512x4,1024x2,1024x4,1024x8,2048x4", help="BLOCKxNUM_WARPS,...")
    parser.add_argument("--out", default="gpu_kernels.json")
    parser.add_argument("--max-tensors", type=int, default=None, help="only the first N tensors (smoke tests)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")  # CPU: TRITON_INTERPRET=1 smoke test of this script
    shapes = WORKLOADS[args.workload]()[:args.max_tensors]
    n = numel(shapes)
    roof_n = 256 * 2**20 if gpu else 2**20
    a, b = torch.rand(roof_n, device=device), torch.empty(roof_n, device=device)
    copy_ms = median_ms(lambda: b.copy_(a), args.repeats)
    copy_bw = 8 * a.numel() / copy_ms / 1e6  # GB/s, bytes read + written
    del a, b
    name = torch.cuda.get_device_name() if gpu else "CPU (interpreter)"
    print(f"{name}  {args.workload}: {len(shapes)} tensors, {n / 1e6:.1f}M params; "
          f"copy {copy_bw:.0f} GB/s")
    results = {"gpu": name, "torch": torch.__version__, "workload": args.workload,
               "params": n, "tensors": len(shapes), "copy_gb_per_s": copy_bw, "rows": []}
    print("| setup | BLOCK x warps | grad pass ms | phase 1 ms | phase 2 ms | lamb_step ms | "
          "lamb_step fraction of copy roof (40 B/param) |")
    print("|---|---|---|---|---|---|---|")
    for setup in ("fp32", "bf16"):
        batch = make_batch(shapes, setup, device)
        steps = torch.full((len(shapes),), 1e-3, dtype=torch.float64, device=device)
        for config in args.configs.split(","):
            block, warps = (int(x) for x in config.split("x"))
            triton_gpu.BLOCK, triton_gpu.NUM_WARPS = block, warps
            grad_ms = median_ms(lambda: triton_gpu.grad_sum_of_squares(batch.grads), args.repeats)
            p1_ms = median_ms(lambda: triton_gpu.phase1_batch(batch), args.repeats)
            p1 = triton_gpu.phase1_batch(batch)
            p2_ms = median_ms(lambda: triton_gpu.phase2_batch(batch, p1, steps), args.repeats)
            step_ms = median_ms(lambda: triton_gpu.lamb_step(batch), args.repeats)
            frac = 40 * n / step_ms / 1e6 / copy_bw
            row = dict(setup=setup, block=block, num_warps=warps, grad_ms=grad_ms, phase1_ms=p1_ms, phase2_ms=p2_ms,
                       step_ms=step_ms, fraction_of_copy=frac,
                       pass_fractions=[nb * n / ms / 1e6 / copy_bw for nb, ms in
                                       zip(BYTES[setup], (grad_ms, p1_ms, p2_ms))])
            results["rows"].append(row)
            print(f"| {setup} | {block}x{warps} | {grad_ms:.3f} | {p1_ms:.3f} | {p2_ms:.3f} | {step_ms:.3f} | "
                  f"{frac:.2f} |")
        del batch
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
