"""mplamb.Lamb under FSDP2: a bf16 model sharded over 2 CPU processes, fp32 masters as DTensors.

Run: ``torchrun --nproc-per-node 2 examples/fsdp2_lamb.py`` (gloo on loopback; ``--steps N``).
Each step costs one all-reduce for all parameters (counted below with ``CommDebugMode``), and
the result equals training the same model in one process, which rank 0 checks at the end.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

import mplamb


def make_model() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)]
    return nn.Sequential(*blocks, nn.Linear(16, 1)).to(torch.bfloat16)  # bf16 weights: Lamb keeps fp32 masters


def batches(steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # every rank sees the same batch here, so one process can replay it exactly
        x = torch.randn(32, 16, generator=g)
        yield x.to(torch.bfloat16), x.sum(dim=1, keepdim=True)


def train(model: nn.Module, steps: int, count: bool = False) -> list:
    opt = mplamb.Lamb(model.parameters(), lr=2e-2, weight_decay=0.01)
    collectives = []
    for x, y in batches(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y).backward()
        with CommDebugMode() as comm:
            opt.step()
        collectives.append(comm.get_total_counts())
    return collectives if count else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model = make_model()
    for block in model[:-1]:
        fully_shard(block)
    fully_shard(model)
    collectives = train(model, args.steps, count=True)
    full = [p.full_tensor().detach().float() for p in model.parameters()]  # a collective: every rank takes part

    if rank == 0:
        single = make_model()
        train(single, args.steps)
        diff = max(float((a - b.detach().float()).abs().max()) for a, b in zip(full, single.parameters()))
        print(f"{args.steps} steps on {dist.get_world_size()} processes; all-reduces per step: {collectives}; "
              f"max |FSDP2 - one process| = {diff:.3g}")
        if diff > 1e-6 or any(c != 1 for c in collectives):
            raise SystemExit("mismatch")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
