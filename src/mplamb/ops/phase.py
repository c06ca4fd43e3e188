"""MXNet's LAMB phase operators on PyTorch tensors.

Names, argument names, defaults and in-place effects are MXNet 1.9.1's
(``mx.nd.lamb_update_phase1`` etc.); the few deliberate deviations are listed in
the README (D1-D9).  The math lives in :mod:`mplamb.kernels.reference`.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .._validate import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_beta,
    check_like,
    check_no_overlap,
    check_real,
    check_step,
    check_tensor,
)
from . import _library  # noqa: F401  (registers torch.ops.mplamb.*)

__all__ = ["lamb_update_phase1", "mp_lamb_update_phase1", "lamb_update_phase2", "mp_lamb_update_phase2"]

Norm = Union[float, torch.Tensor]


def phase1_hyper(
    *, wd: object, beta1: object, beta2: object, epsilon: object, bias_correction: object,
    rescale_grad: object, clip_gradient: object,
) -> Dict[str, object]:
    """Validated phase-1 hyper-parameters (shared with the multi-tensor operators)."""
    if not isinstance(bias_correction, bool):
        raise TypeError(f"bias_correction: expected a bool, got {type(bias_correction).__name__}")
    return dict(
        wd=check_real("wd", wd),
        beta1=check_beta("beta1", beta1),
        beta2=check_beta("beta2", beta2),
        epsilon=check_real("epsilon", epsilon, minimum=0.0),
        bias_correction=bias_correction,
        rescale_grad=check_real("rescale_grad", rescale_grad),
        clip_gradient=check_real("clip_gradient", clip_gradient, finite=False),
    )


def phase2_hyper(*, lr: object, lower_bound: object, upper_bound: object) -> Dict[str, float]:
    """Validated phase-2 hyper-parameters (shared with the multi-tensor operators)."""
    return dict(
        lr=check_real("lr", lr, minimum=0.0),
        lower_bound=check_real("lower_bound", lower_bound, finite=False),
        upper_bound=check_real("upper_bound", upper_bound, finite=False),
    )


def lamb_update_phase1(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *,
    t: int,
    wd: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    bias_correction: bool = True,
    rescale_grad: float = 1.0,
    clip_gradient: float = -1.0,
) -> torch.Tensor:
    """Phase 1 of LAMB: update the moments in place and return the Adam direction plus decay.

    Per element, in float32 (float64 for float64 tensors; float16/bfloat16 are widened
    once and the results rounded once)::

        s    = clip(grad * rescale_grad, clip_gradient)      # clipping only if clip_gradient > 0
        mean = beta1 * mean + (1 - beta1) * s                # in place
        var  = beta2 * var + (1 - beta2) * s * s             # in place
        g    = mean_hat / (sqrt(var_hat) + epsilon) + wd * weight
        mean_hat = mean / (1 - beta1**t),  var_hat = var / (1 - beta2**t)   # if bias_correction

    ``weight``, ``grad``, ``mean`` and ``var`` share one dtype (float16, bfloat16,
    float32 or float64), shape and device.  Returns ``g`` in that dtype.  MXNet:
    ``mx.nd.lamb_update_phase1``.

    >>> w, g = torch.ones(3), torch.full((3,), 0.5)
    >>> m, v = torch.zeros(3), torch.zeros(3)
    >>> lamb_update_phase1(w, g, m, v, t=1, wd=0.0)
    tensor([1.0000, 1.0000, 1.0000])
    >>> m
    tensor([0.0500, 0.0500, 0.0500])
    """
    check_tensor("weight", weight, FLOAT_DTYPES)
    for name, x in (("grad", grad), ("mean", mean), ("var", var)):
        check_like(name, x, weight, "weight", (weight.dtype,))
    t = check_step("t", t)
    hp = phase1_hyper(wd=wd, beta1=beta1, beta2=beta2, epsilon=epsilon, bias_correction=bias_correction,
                      rescale_grad=rescale_grad, clip_gradient=clip_gradient)
    check_no_overlap({"mean": mean, "var": var}, {"weight": weight, "grad": grad})
    with torch.no_grad():
        return torch.ops.mplamb.lamb_update_phase1(weight, grad, mean, var, t, hp["wd"], hp["beta1"], hp["beta2"],
                                                    hp["epsilon"], hp["bias_correction"], hp["rescale_grad"],
                                                    hp["clip_gradient"])


def mp_lamb_update_phase1(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight32: torch.Tensor,
    *,
    t: int,
    wd: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    bias_correction: bool = True,
    rescale_grad: float = 1.0,
    clip_gradient: float = -1.0,
) -> torch.Tensor:
    """Mixed-precision phase 1: float16/bfloat16 ``weight``/``grad``, float32 state.

    Same math as :func:`lamb_update_phase1` with ``s = float32(grad) * rescale_grad``
    (mplamb D3) and the decay taken from the float32 master ``weight32``
    (``weight`` is not read).  Updates ``mean``/``var`` in place; returns ``g`` in
    float32.  MXNet: ``mx.nd.mp_lamb_update_phase1``.
    """
    check_tensor("weight", weight, HALF_DTYPES)
    check_like("grad", grad, weight, "weight", (weight.dtype,))
    for name, x in (("mean", mean), ("var", var), ("weight32", weight32)):
        check_like(name, x, weight, "weight", (torch.float32,))
    t = check_step("t", t)
    hp = phase1_hyper(wd=wd, beta1=beta1, beta2=beta2, epsilon=epsilon, bias_correction=bias_correction,
                      rescale_grad=rescale_grad, clip_gradient=clip_gradient)
    check_no_overlap({"mean": mean, "var": var}, {"weight": weight, "grad": grad, "weight32": weight32})
    with torch.no_grad():
        return torch.ops.mplamb.mp_lamb_update_phase1(weight, grad, mean, var, weight32, t, hp["wd"], hp["beta1"],
                                                       hp["beta2"], hp["epsilon"], hp["bias_correction"],
                                                       hp["rescale_grad"], hp["clip_gradient"])


def _norm_arg(name: str, r: Norm, weight: torch.Tensor) -> torch.Tensor:
    """``r1``/``r2``: a Python float or a one-element floating tensor, as a 0-d tensor."""
    if isinstance(r, torch.Tensor):
        check_tensor(name, r, FLOAT_DTYPES)
        if r.numel() != 1:
            raise ValueError(f"{name}: expected one element (a norm), got shape {tuple(r.shape)}")
        if r.device != weight.device and r.device.type != "cpu":
            raise ValueError(f"{name}: expected device {weight.device} (the device of weight) or cpu, got {r.device}")
        return r.reshape(()).to(weight.device)
    value = check_real(name, r, finite=False, allow_nan=True)  # a NaN norm gives NaN weights, as in MXNet
    return torch.tensor(value, dtype=torch.float64, device=weight.device)


def _out_arg(out: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(weight)
    return check_like("out", out, weight, "weight", (weight.dtype,))


def lamb_update_phase2(
    weight: torch.Tensor,
    g: torch.Tensor,
    r1: Norm,
    r2: Norm,
    *,
    lr: float,
    lower_bound: float = -1.0,
    upper_bound: float = -1.0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Phase 2 of LAMB: the layer-wise trust-ratio step.

    With ``r1 = ||weight||`` and ``r2 = ||g||`` (computed by the caller)::

        r1'  = min(max(r1, lower_bound), upper_bound)   # each bound only if > 0
        step = lr if r1' == 0 or r2 == 0 else (lr * r1') / r2
        new  = weight - step * g

    Returns ``new`` in ``weight``'s dtype; writes it into ``out`` when given
    (``out=weight`` updates in place) and changes nothing else.  ``r1``/``r2`` may be
    Python floats, 0-d or one-element tensors.  MXNet: ``mx.nd.lamb_update_phase2``.
    """
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_like("g", g, weight, "weight", (weight.dtype,))
    r1t, r2t = _norm_arg("r1", r1, weight), _norm_arg("r2", r2, weight)
    hp = phase2_hyper(lr=lr, lower_bound=lower_bound, upper_bound=upper_bound)
    out_t = _out_arg(out, weight)
    check_no_overlap({"out": out_t}, {"weight": weight, "g": g}, allowed_alias=[("out", "weight")])
    with torch.no_grad():
        torch.ops.mplamb.lamb_update_phase2(weight, g, r1t, r2t, out_t, hp["lr"], hp["lower_bound"], hp["upper_bound"])
    return out_t


def mp_lamb_update_phase2(
    weight: torch.Tensor,
    g: torch.Tensor,
    r1: Norm,
    r2: Norm,
    weight32: torch.Tensor,
    *,
    lr: float,
    lower_bound: float = -1.0,
    upper_bound: float = -1.0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed-precision phase 2: ``weight32 = weight32 - step * g`` in place, returns its rounding.

    ``step`` as in :func:`lamb_update_phase2`, in float32.  ``weight`` is float16 or
    bfloat16 (only its dtype is used), ``g`` and ``weight32`` float32.  Returns
    ``weight.dtype(weight32)``, written into ``out`` when given.  Unlike MXNet 1.9.1,
    ``weight32`` is updated (mplamb D4, as MXNet documents).
    MXNet: ``mx.nd.mp_lamb_update_phase2``.
    """
    check_tensor("weight", weight, HALF_DTYPES)
    check_like("g", g, weight, "weight", (torch.float32,))
    check_like("weight32", weight32, weight, "weight", (torch.float32,))
    r1t, r2t = _norm_arg("r1", r1, weight), _norm_arg("r2", r2, weight)
    hp = phase2_hyper(lr=lr, lower_bound=lower_bound, upper_bound=upper_bound)
    out_t = _out_arg(out, weight)
    check_no_overlap({"weight32": weight32, "out": out_t}, {"weight": weight, "g": g},
                     allowed_alias=[("out", "weight")])
    with torch.no_grad():
        torch.ops.mplamb.mp_lamb_update_phase2(weight, g, r1t, r2t, weight32, out_t, hp["lr"], hp["lower_bound"],
                                                hp["upper_bound"])
    return out_t
