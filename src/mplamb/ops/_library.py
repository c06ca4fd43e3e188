"""The operators registered with ``torch.library`` (namespace ``mplamb``).

These are the graph-level forms (the counterpart of MXNet's ``mx.symbol``):
``torch.compile(fullgraph=True)`` keeps them as opaque calls with declared in-place
effects, so compiled code runs the same kernels as eager code, bit for bit.
Arguments arrive validated and normalised by :mod:`mplamb.ops`; these bodies only
select the kernel.  Every out-parameter is written, never returned, so no output
aliases an input.
"""
from __future__ import annotations

from typing import List

import torch

from .._scalars import compute_dtype, f32, phase1_scalars, step_sizes
from ..kernels import LambBatch, get_backend, local_reducer
from ..kernels import reference

__all__: List[str] = []


@torch.library.custom_op("mplamb::lamb_update_phase1", mutates_args=("mean", "var"))
def _lamb_update_phase1(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    t: int,
    wd: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction: bool,
    rescale_grad: float,
    clip_gradient: float,
) -> torch.Tensor:
    sc = phase1_scalars(
        t=t, wd=wd, beta1=beta1, beta2=beta2, epsilon=epsilon, bias_correction=bias_correction,
        rescale_grad=rescale_grad, clip_gradient=clip_gradient, dtype=compute_dtype(weight.dtype),
    )
    return reference.phase1(weight, grad, mean, var, sc).to(weight.dtype)


@_lamb_update_phase1.register_fake
def _(weight, grad, mean, var, t, wd, beta1, beta2, epsilon, bias_correction, rescale_grad, clip_gradient):
    return torch.empty_like(weight)


@torch.library.custom_op("mplamb::mp_lamb_update_phase1", mutates_args=("mean", "var"))
def _mp_lamb_update_phase1(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight32: torch.Tensor,
    t: int,
    wd: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    bias_correction: bool,
    rescale_grad: float,
    clip_gradient: float,
) -> torch.Tensor:
    sc = phase1_scalars(
        t=t, wd=wd, beta1=beta1, beta2=beta2, epsilon=epsilon, bias_correction=bias_correction,
        rescale_grad=rescale_grad, clip_gradient=clip_gradient, dtype=torch.float32,
    )
    return reference.phase1(weight32, grad, mean, var, sc)


@_mp_lamb_update_phase1.register_fake
def _(weight, grad, mean, var, weight32, t, wd, beta1, beta2, epsilon, bias_correction, rescale_grad, clip_gradient):
    return torch.empty_like(weight32)


def _phase2_step(r1: torch.Tensor, r2: torch.Tensor, dtype: torch.dtype, lr: float, lower_bound: float, upper_bound: float) -> torch.Tensor:
    return step_sizes(f32(lr), r1.to(dtype), r2.to(dtype), lower_bound=lower_bound, upper_bound=upper_bound)


@torch.library.custom_op("mplamb::lamb_update_phase2", mutates_args=("out",))
def _lamb_update_phase2(
    weight: torch.Tensor,
    g: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    out: torch.Tensor,
    lr: float,
    lower_bound: float,
    upper_bound: float,
) -> None:
    c = compute_dtype(weight.dtype)
    step = _phase2_step(r1, r2, c, lr, lower_bound, upper_bound)
    reference.phase2(weight, g.to(c), step, out)


@_lamb_update_phase2.register_fake
def _(weight, g, r1, r2, out, lr, lower_bound, upper_bound):
    return None


@torch.library.custom_op("mplamb::mp_lamb_update_phase2", mutates_args=("weight32", "out"))
def _mp_lamb_update_phase2(
    weight: torch.Tensor,
    g: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    weight32: torch.Tensor,
    out: torch.Tensor,
    lr: float,
    lower_bound: float,
    upper_bound: float,
) -> None:
    step = _phase2_step(r1, r2, torch.float32, lr, lower_bound, upper_bound)
    reference.phase2(weight32, g, step, out, master=weight32)


@_mp_lamb_update_phase2.register_fake
def _(weight, g, r1, r2, weight32, out, lr, lower_bound, upper_bound):
    return None


def _run_multi(weights, grads, means, vars_, weights32, outs, step_count, learning_rates, wds,
               beta1, beta2, epsilon, rescale_grad, lower_bound, upper_bound, clip_gradient,
               bias_correction, backend) -> None:
    masters = list(weights32) if weights32 is not None else [None] * len(weights)
    scalars = [
        phase1_scalars(
            t=t, wd=wd, beta1=beta1, beta2=beta2, epsilon=epsilon, bias_correction=bias_correction,
            rescale_grad=rescale_grad, clip_gradient=clip_gradient,
            dtype=compute_dtype((m if m is not None else w).dtype),
        )
        for t, wd, w, m in zip(step_count, wds, weights, masters)
    ]
    batch = LambBatch(
        weights=list(weights), grads=list(grads), means=list(means), vars=list(vars_), masters=masters,
        outs=list(outs), scalars=scalars, lrs=list(learning_rates),
        lower_bound=lower_bound, upper_bound=upper_bound,
    )
    get_backend(backend, weights[0].device).lamb_step(batch, local_reducer)


@torch.library.custom_op("mplamb::multi_lamb_update", mutates_args=("means", "vars", "outs"))
def _multi_lamb_update(
    weights: List[torch.Tensor],
    grads: List[torch.Tensor],
    means: List[torch.Tensor],
    vars: List[torch.Tensor],
    outs: List[torch.Tensor],
    step_count: List[int],
    learning_rates: List[float],
    wds: List[float],
    beta1: float,
    beta2: float,
    epsilon: float,
    rescale_grad: float,
    lower_bound: float,
    upper_bound: float,
    clip_gradient: float,
    bias_correction: bool,
    backend: str,
) -> None:
    _run_multi(weights, grads, means, vars, None, outs, step_count, learning_rates, wds, beta1, beta2,
               epsilon, rescale_grad, lower_bound, upper_bound, clip_gradient, bias_correction, backend)


@_multi_lamb_update.register_fake
def _(weights, grads, means, vars, outs, *args):
    return None


@torch.library.custom_op("mplamb::multi_mp_lamb_update", mutates_args=("means", "vars", "weights32", "outs"))
def _multi_mp_lamb_update(
    weights: List[torch.Tensor],
    grads: List[torch.Tensor],
    means: List[torch.Tensor],
    vars: List[torch.Tensor],
    weights32: List[torch.Tensor],
    outs: List[torch.Tensor],
    step_count: List[int],
    learning_rates: List[float],
    wds: List[float],
    beta1: float,
    beta2: float,
    epsilon: float,
    rescale_grad: float,
    lower_bound: float,
    upper_bound: float,
    clip_gradient: float,
    bias_correction: bool,
    backend: str,
) -> None:
    _run_multi(weights, grads, means, vars, weights32, outs, step_count, learning_rates, wds, beta1, beta2,
               epsilon, rescale_grad, lower_bound, upper_bound, clip_gradient, bias_correction, backend)


@_multi_mp_lamb_update.register_fake
def _(weights, grads, means, vars, weights32, outs, *args):
    return None
