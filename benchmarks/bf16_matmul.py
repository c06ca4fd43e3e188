"""Why the main job keeps bf16 weights but computes in fp32 on this CPU: bf16 vs fp32 timings.

Run: ``python benchmarks/bf16_matmul.py``.  Times (best of 10) one ``F.linear`` of a 4096x128
input by a 384x128 weight, and one forward+backward of the main job's model on a 32x128 batch
(the ``python -m mplamb train`` defaults), in float32 and in bfloat16.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mplamb.demo.model import TinyGPT
from mplamb.train import TrainConfig


def best_of(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    cfg = TrainConfig()
    gpt = cfg.model_config()
    idx = torch.randint(0, gpt.vocab, (cfg.batch_size, cfg.context))
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(4096, 128, dtype=dtype), torch.randn(384, 128, dtype=dtype)
        linear = best_of(lambda: F.linear(x, w))
        torch.manual_seed(0)
        model = TinyGPT(gpt).to(dtype)

        def step():
            model.zero_grad()
            F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten()).backward()

        print(f"{str(dtype):15s} linear {linear * 1e3:7.2f} ms   model forward+backward {best_of(step, 3):6.3f} s")


if __name__ == "__main__":
    main()
