"""An independent float64 model of ``mplamb.Lamb`` (its docstring's math), for tests.

Plain and slow on purpose: one parameter at a time, float64 throughout, written
from the documented algorithm rather than from mplamb's kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch


class LambModel:
    def __init__(self, params: List[torch.Tensor], *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, grad_averaging=True, max_grad_norm=None, clip_gradient=None, rescale_grad=1.0,
                 lower_bound=None, upper_bound=None, max_trust_ratio=None, layer_adaptation=True):
        self.w = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.t = [0 for _ in self.w]
        self.h = dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, bc=bias_correction, ga=grad_averaging,
                      mgn=max_grad_norm, clip=clip_gradient, rg=rescale_grad, lb=lower_bound, ub=upper_bound,
                      mtr=max_trust_ratio, adapt=layer_adaptation)

    def step(self, grads: List[Optional[torch.Tensor]], lr: Optional[float] = None) -> None:
        h = self.h
        lr = h["lr"] if lr is None else lr
        b1, b2 = h["betas"]
        gs = [None if g is None else g.detach().to(torch.float64) * h["rg"] for g in grads]
        factor = 1.0
        if h["mgn"] is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None))
            if total > h["mgn"]:
                factor = h["mgn"] / total
        for i, g in enumerate(gs):
            if g is None:
                continue
            s = g * factor
            if h["clip"] is not None:
                s = s.clamp(-h["clip"], h["clip"])
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + ((1 - b1) if h["ga"] else 1.0) * s
            self.v[i] = b2 * self.v[i] + (1 - b2) * s * s
            mh, vh = self.m[i], self.v[i]
            if h["bc"]:
                mh = mh / (1 - b1 ** t)
                vh = vh / (1 - b2 ** t)
            u = mh / (vh.sqrt() + h["eps"]) + h["wd"] * self.w[i]
            r1 = float(self.w[i].norm())
            r2 = float(u.norm())
            if h["lb"] is not None:
                r1 = max(r1, h["lb"])
            if h["ub"] is not None:
                r1 = min(r1, h["ub"])
            if not h["adapt"] or r1 == 0 or r2 == 0:
                eta = lr
            else:
                ratio = r1 / r2
                if h["mtr"] is not None:
                    ratio = min(ratio, h["mtr"])
                eta = lr * ratio
            self.w[i] = self.w[i] - eta * u
