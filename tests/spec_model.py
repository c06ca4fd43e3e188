"""An independent numpy model of the mplamb operator specification (tests/golden/NOTES.md).

Written from the specification, not from mplamb's code: numpy evaluates every
float32 operation as one IEEE operation, so this model is bit-exact wherever the
specification is.  bfloat16 (absent from numpy) goes through torch for the two
conversions only (widening is exact; narrowing is round-to-nearest-even).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def to_np(x: torch.Tensor, compute: np.dtype) -> np.ndarray:
    return x.detach().to(torch.float64 if compute == np.float64 else torch.float32).cpu().numpy().astype(compute)


def from_np(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def compute_np(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def phase1(w, grad, mean, var, *, t, wd, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
           rescale_grad=1.0, clip_gradient=-1.0):
    """Returns (g, new_mean, new_var) as numpy arrays of the compute dtype."""
    c = compute_np(w.dtype)
    f = np.float32
    b1, b2, eps, wdv, rg, clip = (c(f(x)) for x in (beta1, beta2, epsilon, wd, rescale_grad, clip_gradient))
    s = to_np(grad, c) * rg
    if clip > 0:
        s = np.where(s > clip, clip, np.where(s < -clip, -clip, s))
    m = b1 * to_np(mean, c) + (c(1) - b1) * s
    v = b2 * to_np(var, c) + ((c(1) - b2) * s) * s
    mh, vh = m, v
    if bias_correction:
        b1t = c(math.pow(float(f(beta1)), t))
        b2t = c(math.pow(float(f(beta2)), t))
        mh = (m.astype(np.float64) / (1.0 - np.float64(b1t))).astype(c)
        vh = v / (c(1) - b2t)
    g = mh / (np.sqrt(vh) + eps) + wdv * to_np(w, c)
    return g, m, v


def phase2(w, g, r1, r2, *, lr, lower_bound=-1.0, upper_bound=-1.0):
    """Returns the new weight as a numpy array of the compute dtype (of ``g``)."""
    c = g.dtype.type
    f = np.float32
    r1, r2 = c(r1), c(r2)
    if lower_bound > 0:
        r1 = c(max(r1, c(f(lower_bound)))) if not np.isnan(r1) else r1
    if upper_bound > 0:
        r1 = c(min(r1, c(f(upper_bound)))) if not np.isnan(r1) else r1
    lrv = c(f(lr))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        step = lrv if (r1 == 0 or r2 == 0) else (lrv * r1) / r2
    return w.astype(c) - step * g


def norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a.astype(np.float64)))))
