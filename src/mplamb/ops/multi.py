"""MXNet's fused multi-tensor LAMB operators on PyTorch tensors.

``multi_lamb_update`` / ``multi_mp_lamb_update`` are MXNet's
``mx.nd.contrib.multi_lamb_update`` / ``multi_mp_lamb_update`` (internally
``_multi_lamb_update``): for every tensor ``i`` they run phase 1, the two norms
``r1_i = ||w_i||`` and ``r2_i = ||g_i||`` and phase 2 in one call.  mplamb defines
them as exactly that composition of the phase operators (deviation D7): the norms
are taken of the float32 master in the mixed-precision form (MXNet squares the
float16 weights, which overflow above 255.9) and accumulated in float64.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .._validate import FLOAT_DTYPES, HALF_DTYPES, check_like, check_list_length, check_no_overlap, check_real, check_step, check_tensor
from ..kernels import resolve_backend_name
from . import _library  # noqa: F401  (registers torch.ops.mplamb.*)
from .phase import phase1_hyper, phase2_hyper

__all__ = ["multi_lamb_update", "multi_mp_lamb_update"]


def _tensor_list(name: str, values: object) -> List[torch.Tensor]:
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(values).__name__}")
    return list(values)


def _validate(
    weights: object, grads: object, means: object, vars: object, weights32: object, out: object,
    step_count: object, learning_rates: object, wds: object, hyper: dict,
) -> tuple:
    """All checks of the multi-tensor operators; returns normalised lists.  Mutates nothing."""
    mp = weights32 is not None
    ws = _tensor_list("weights", weights)
    if not ws:
        raise ValueError("weights: expected at least one tensor, got an empty list")
    n = len(ws)
    lists = {"grads": grads, "means": means, "vars": vars}
    if mp:
        lists["weights32"] = weights32
    normal = {}
    for name, values in lists.items():
        normal[name] = check_list_length(name, _tensor_list(name, values), n)
    outs = None if out is None else check_list_length("out", _tensor_list("out", out), n)
    steps = [check_step(f"step_count[{i}]", t) for i, t in enumerate(check_list_length("step_count", step_count, n))]
    lrs = [check_real(f"learning_rates[{i}]", v, minimum=0.0) for i, v in enumerate(check_list_length("learning_rates", learning_rates, n))]
    wd_values = [check_real(f"wds[{i}]", v) for i, v in enumerate(check_list_length("wds", wds, n))]
    device = None
    for i, w in enumerate(ws):
        check_tensor(f"weights[{i}]", w, HALF_DTYPES if mp else FLOAT_DTYPES)
        if device is None:
            device = w.device
        elif w.device != device:
            raise ValueError(f"weights[{i}]: expected device {device} (the device of weights[0]), got {w.device}")
        state_dtype = torch.float32 if mp else w.dtype
        check_like(f"grads[{i}]", normal["grads"][i], w, f"weights[{i}]", (w.dtype,))
        check_like(f"means[{i}]", normal["means"][i], w, f"weights[{i}]", (state_dtype,))
        check_like(f"vars[{i}]", normal["vars"][i], w, f"weights[{i}]", (state_dtype,))
        if mp:
            check_like(f"weights32[{i}]", normal["weights32"][i], w, f"weights[{i}]", (torch.float32,))
        if outs is not None:
            check_like(f"out[{i}]", outs[i], w, f"weights[{i}]", (w.dtype,))
    # No tensor written in place may overlap any other argument, across the whole list.
    mutated, read, alias = {}, {}, []
    for i in range(n):
        mutated[f"means[{i}]"] = normal["means"][i]
        mutated[f"vars[{i}]"] = normal["vars"][i]
        if mp:
            mutated[f"weights32[{i}]"] = normal["weights32"][i]
        if outs is not None:
            mutated[f"out[{i}]"] = outs[i]
            alias.append((f"out[{i}]", f"weights[{i}]"))
        read[f"weights[{i}]"] = ws[i]
        read[f"grads[{i}]"] = normal["grads"][i]
    check_no_overlap(mutated, read, allowed_alias=alias)
    if outs is None:
        outs = [torch.empty_like(w) for w in ws]
    return ws, normal, outs, steps, lrs, wd_values


def _multi(weights, grads, means, vars, weights32, *, out, step_count, learning_rates, wds, backend, **hyper):
    p1 = phase1_hyper(wd=0.0, **{k: hyper[k] for k in ("beta1", "beta2", "epsilon", "bias_correction", "rescale_grad", "clip_gradient")})
    p2 = phase2_hyper(lr=0.0, lower_bound=hyper["lower_bound"], upper_bound=hyper["upper_bound"])
    ws, normal, outs, steps, lrs, wd_values = _validate(
        weights, grads, means, vars, weights32, out, step_count, learning_rates, wds, hyper)
    if not torch.compiler.is_compiling():  # (the op body resolves it again when it runs)
        backend = resolve_backend_name(backend, ws[0].device)  # a clear error before anything runs
    args = (p1["beta1"], p1["beta2"], p1["epsilon"], p1["rescale_grad"], p2["lower_bound"], p2["upper_bound"],
            p1["clip_gradient"], p1["bias_correction"], backend)
    with torch.no_grad():
        if weights32 is None:
            torch.ops.mplamb.multi_lamb_update(ws, normal["grads"], normal["means"], normal["vars"], outs, steps, lrs,
                                               wd_values, *args)
        else:
            torch.ops.mplamb.multi_mp_lamb_update(ws, normal["grads"], normal["means"], normal["vars"],
                                                  normal["weights32"], outs, steps, lrs, wd_values, *args)
    return outs


def multi_lamb_update(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    means: Sequence[torch.Tensor],
    vars: Sequence[torch.Tensor],
    *,
    step_count: Sequence[int],
    learning_rates: Sequence[float],
    wds: Sequence[float],
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    rescale_grad: float = 1.0,
    lower_bound: float = -1.0,
    upper_bound: float = -1.0,
    clip_gradient: float = -1.0,
    bias_correction: bool = True,
    out: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
) -> List[torch.Tensor]:
    """Fused LAMB over a list of tensors: per tensor ``i``::

        g_i  = lamb_update_phase1(w_i, grad_i, mean_i, var_i, t=step_count[i], wd=wds[i], ...)
        new_i = lamb_update_phase2(w_i, g_i, ||w_i||, ||g_i||, lr=learning_rates[i], ...)

    ``means``/``vars`` are updated in place; the new weights are returned, written into
    ``out`` when given (``out=weights`` updates in place, as MXNet's optimizer does).
    ``backend`` picks the kernels (``"auto"``, ``"reference"``, ...; see
    :func:`mplamb.kernels.available_backends`).  MXNet: ``mx.nd.contrib.multi_lamb_update``.
    """
    return _multi(weights, grads, means, vars, None, out=out, step_count=step_count, learning_rates=learning_rates,
                  wds=wds, backend=backend, beta1=beta1, beta2=beta2, epsilon=epsilon, rescale_grad=rescale_grad,
                  lower_bound=lower_bound, upper_bound=upper_bound, clip_gradient=clip_gradient,
                  bias_correction=bias_correction)


def multi_mp_lamb_update(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    means: Sequence[torch.Tensor],
    vars: Sequence[torch.Tensor],
    weights32: Sequence[torch.Tensor],
    *,
    step_count: Sequence[int],
    learning_rates: Sequence[float],
    wds: Sequence[float],
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    rescale_grad: float = 1.0,
    lower_bound: float = -1.0,
    upper_bound: float = -1.0,
    clip_gradient: float = -1.0,
    bias_correction: bool = True,
    out: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
) -> List[torch.Tensor]:
    """Mixed-precision fused LAMB: float16/bfloat16 weights and grads, float32 state.

    Per tensor, :func:`mp_lamb_update_phase1` then :func:`mp_lamb_update_phase2` with
    ``r1 = ||weights32[i]||`` and ``r2 = ||g_i||``: ``means``, ``vars`` and ``weights32``
    are updated in place; the new half-precision weights (the rounded masters) are
    returned and written into ``out`` when given.  MXNet: ``mx.nd.contrib.multi_mp_lamb_update``.
    """
    if weights32 is None:
        raise TypeError("weights32: expected a list of float32 tensors, got None")
    return _multi(weights, grads, means, vars, weights32, out=out, step_count=step_count,
                  learning_rates=learning_rates, wds=wds, backend=backend, beta1=beta1, beta2=beta2, epsilon=epsilon,
                  rescale_grad=rescale_grad, lower_bound=lower_bound, upper_bound=upper_bound,
                  clip_gradient=clip_gradient, bias_correction=bias_correction)
