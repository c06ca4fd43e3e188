"""LAMB for CPU offload: FSDP2 with ``CPUOffloadPolicy`` (compute on the GPU, the step on the CPU).

    python benchmarks/cpu_offload.py [--layers 12 --width 768] [--steps 6] [--out cpu_offload.json]

One process, one GPU.  The model's sharded parameters, their gradients and the optimizer state
live in the CPU's (pinned) memory; forward and backward run on the GPU.  ``mplamb.Lamb`` steps the
CPU shards with its fused CPU kernels (``backend="auto"`` on CPU parameters) and is compared with
``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)`` on the same offloaded parameters:
the median wall time of ``opt.step()`` alone (the CPU step; the GPU is idle meanwhile).

It also checks the result: the offloaded Lamb (fp32 weights) against the same steps of
``mplamb.Lamb`` on the GPU without offload; exits non-zero when they differ by more than float32
rounding of the norms allows (``--tolerance``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import mplamb
from mplamb.kernels import resolve_backend_name


def make_model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(layers)]
    return nn.Sequential(*blocks).cuda()


def shard(model: nn.Module, offload: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cuda", (1,))
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in model:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, width: int) -> list:
    """``steps`` training steps; the wall time of each ``opt.step()`` in ms."""
    g = torch.Generator(device="cuda").manual_seed(1)
    times = []
    for _ in range(steps):
        x = torch.randn(32, width, device="cuda", generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--steps", type=int, default=6, help="steps per optimizer (the first two are not timed)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |offloaded - GPU| of the Lamb weights")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cpu_offload: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        rows = {}
        params = sum(p.numel() for p in make_model(args.layers, args.width).parameters())
        candidates = {
            "mplamb.Lamb (fused CPU)": lambda ps: mplamb.Lamb(ps, lr=1e-3, weight_decay=0.01),
            "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
            "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
        }
        final = {}
        for name, make in candidates.items():
            model = shard(make_model(args.layers, args.width), offload=True)
            assert all(p.device.type == "cpu" for p in model.parameters())
            opt = make(list(model.parameters()))
            times = run(model, opt, args.steps, args.width)
            rows[name] = statistics.median(times[2:]) if len(times) > 2 else statistics.median(times)
            if name.startswith("mplamb"):
                final = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        reference = shard(make_model(args.layers, args.width), offload=False)
        run(reference, mplamb.Lamb(list(reference.parameters()), lr=1e-3, weight_decay=0.01), args.steps, args.width)
        diff = max(float((final[n] - p.full_tensor().detach().cpu()).abs().max())
                   for n, p in reference.named_parameters())
        lamb = rows["mplamb.Lamb (fused CPU)"]
        result = {
            "command": "python benchmarks/cpu_offload.py " + " ".join(sys.argv[1:]),
            "gpu": torch.cuda.get_device_name(), "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "params": params,
            "step_ms": rows, "lamb_vs": {k: lamb / v for k, v in rows.items()},
            "max_abs_diff_vs_gpu_lamb": diff, "backend": resolve_backend_name("auto", "cpu"),
        }
        print(f"FSDP2 CPUOffloadPolicy, {params / 1e6:.1f}M fp32 params, Lamb backend {result['backend']}, "
              f"{torch.get_num_threads()} CPU threads, "
              f"{result['gpu']}, torch {torch.__version__}")
        print("| optimizer | CPU step ms | mplamb.Lamb / this |\n|---|---|---|")
        for k, v in rows.items():
            print(f"| {k} | {v:.1f} | {lamb / v:.2f} |")
        print(f"offloaded Lamb vs Lamb on the GPU: max |diff| = {diff:.3g}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if diff <= args.tolerance else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
