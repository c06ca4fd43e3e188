"""mplamb in one minute: MXNet's mixed-precision LAMB operators on PyTorch tensors.

Run: ``python examples/quickstart.py``.  One LAMB step on a bfloat16 weight with an
fp32 master, exactly as MXNet's ``mp_lamb_update_phase1``/``phase2`` define it.
"""
import torch

import mplamb

torch.manual_seed(0)
weight32 = torch.randn(4, 3)                   # fp32 master weight
weight = weight32.to(torch.bfloat16)           # the model's bf16 weight
grad = (torch.randn(4, 3) * 1024).to(torch.bfloat16)   # a loss-scaled gradient
mean, var = torch.zeros(4, 3), torch.zeros(4, 3)

g = mplamb.mp_lamb_update_phase1(weight, grad, mean, var, weight32, t=1, wd=0.01, rescale_grad=1 / 1024)
r1, r2 = weight32.norm(), g.norm()
mplamb.mp_lamb_update_phase2(weight, g, r1, r2, weight32, lr=0.01, out=weight)
print(f"trust ratio ||w||/||g|| = {float(r1 / r2):.4f}")
print("updated bf16 weight:\n", weight)
