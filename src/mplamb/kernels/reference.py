"""The reference backend: plain per-tensor PyTorch, readable, the source of truth.

Every other backend is tested against this module.  Each function performs one
named stage of LAMB with MXNet's exact order of operations (see ``_scalars`` for
the scalar values and ``tests/golden/NOTES.md`` for the specification)::

    phase 1   s    = clip(c(grad) * rescale)                      c = compute dtype
              mean = beta1*mean + (1-beta1)*s
              var  = beta2*var  + ((1-beta2)*s)*s
              g    = mean_hat / (sqrt(var_hat) + eps) + wd * w     (Adam direction + decay)
    norms     r1 = ||w||,  r2 = ||g||                               (sums of squares in float64)
    phase 2   w    = w - step * g,  step from ``_scalars.step_sizes`` (trust ratio * lr)

Every arithmetic operation is a separate tensor operation, so nothing is fused
into a multiply-add and float32 results are bit-for-bit MXNet's.

A lean batch (``batch.lean``: moments stored in a format of :mod:`.codec`, Kahan-compensated
weights) runs the same stages around the codec (:func:`lean_update`)::

    phase 1   w          = effective weight (float32(p) + float32(c) with a compensation, else as above)
              mean, var  = moments from decode(codes), as above
              codes      = encode(mean, var)                  (var dithered by the step count)
              g          = direction(decode(codes), w)         (the update the stored state gives; blocked
                                                                formats: :func:`blocked_direction`, "bf16":
                                                                :func:`factored_direction`)
    phase 2   new = w - step * g;  p = RN(new), c = RN(new - float32(p)) with a compensation

A capturable batch (``batch.on_device``) takes its bias corrections from the device row of
each tensor's step count (the same values ``_scalars`` gives the host), its lr from a device
tensor, and writes every result through ``where(skip, old, new)``: a skipped step leaves every
tensor bitwise as it was, without the host ever reading the flag.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple, Union

import torch

from .._scalars import Phase1Scalars, compute_dtype
from . import codec
from ._ieee import ieee_sqrt
from .contract import LambBatch, NormReducer, Phase1Result, StepResult, local_reducer, run_step

CAPTURABLE = True  # steps batches with device scalars (batch.on_device) without a host synchronisation
LEAN = True  # steps lean batches (moments in a codec format, Kahan-compensated weights)

__all__ = ["CAPTURABLE", "LEAN", "lean_weight", "lean_update", "bias_factors", "blocked_direction",
           "factored_direction", "moments", "direction", "phase1", "phase2", "phase1_batch", "phase2_batch",
           "sum_of_squares",
           "grad_sum_of_squares", "lamb_step"]

Scale = Union[float, torch.Tensor]


def moments(
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sc: Phase1Scalars,
    c: torch.dtype,
    rescale: Optional[Scale] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The new ``(mean, var)`` in the compute dtype ``c``; nothing is written."""
    s = grad.to(c) * (sc.rescale if rescale is None else rescale)
    if sc.clip is not None:
        s = torch.clamp(s, -sc.clip, sc.clip)
    m = mean.to(c) * sc.beta1 + s * sc.one_minus_beta1
    v = var.to(c) * sc.beta2 + (s * sc.one_minus_beta2) * s
    return m, v


def direction(m: torch.Tensor, v: torch.Tensor, w: torch.Tensor, sc: Phase1Scalars,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g = mean_hat / (sqrt(var_hat) + eps) + wd * w`` from the new moments (compute dtype).

    ``bias``: this step's ``(bias1, bias2, ...)`` float64 row on the device (capturable steps),
    used instead of ``sc.bias1``/``sc.bias2`` (which then only say whether to correct at all)."""
    c = m.dtype
    if sc.bias1 is not None:
        bias1, bias2 = (sc.bias1, sc.bias2) if bias is None else (bias[0], bias[1].to(c))
        m = (m.to(torch.float64) / bias1).to(c)
        v = v / bias2
    return m / (ieee_sqrt(v) + sc.epsilon) + w.to(c) * sc.wd


def phase1(
    w: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sc: Phase1Scalars,
    rescale: Optional[Scale] = None,
) -> torch.Tensor:
    """Phase 1 in place on ``mean``/``var``; returns ``g`` in the compute dtype of ``w``.

    ``w`` is the weight the decay applies to (the fp32 master in mixed precision).
    ``rescale`` overrides ``sc.rescale`` (a 0-d tensor: a loss-scale or clip factor
    that lives on the device).
    """
    m, v = moments(grad, mean, var, sc, compute_dtype(w.dtype), rescale)
    mean.copy_(m)
    var.copy_(v)
    return direction(m, v, w, sc)


def phase2(
    w: torch.Tensor,
    g: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor,
    master: Optional[torch.Tensor] = None,
) -> None:
    """``new = w - step * g`` in ``g``'s dtype; written to ``master`` (if given) and ``out``.

    ``w`` is the master when there is one.  ``step`` is a 0-d tensor of ``g``'s dtype.
    ``out`` may be ``w`` itself (in-place update).
    """
    new = w.to(g.dtype) - step * g
    if master is not None:
        master.copy_(new)
    out.copy_(new)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2)`` accumulated in float64 (0-d tensor)."""
    x = x.to(torch.float64)
    return torch.sum(x * x)


def lean_weight(batch: LambBatch, i: int) -> torch.Tensor:
    """The weight tensor ``i`` of a lean batch stands for, in its compute dtype: the effective weight
    ``float32(p) + float32(c)`` of a Kahan-compensated one, else the decay source."""
    comp = None if batch.comps is None else batch.comps[i]
    if comp is not None:
        return codec.effective_weight(batch.weights[i], comp)
    w = batch.decay_source(i)
    return w.to(compute_dtype(w.dtype))


def lean_update(batch: LambBatch, i: int, w: torch.Tensor, t: Union[int, torch.Tensor],
                bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, tuple]:
    """Phase 1 of tensor ``i`` of a lean batch, nothing written: the direction ``g`` and the new state
    ``(mean codes, mean scales, var codes, var scales)`` (scales None for unblocked formats).

    The stored moments are decoded, updated as :func:`moments` does, encoded (the second moment
    dithered by the step ``t``), and ``g`` is computed from the *new codes* and ``w``
    (:func:`lean_weight`; blocked formats: :func:`blocked_direction`): exactly the update the stored
    state gives."""
    fmt, shape = batch.moment_format, batch.weights[i].shape
    ms = None if batch.mean_scales is None else batch.mean_scales[i]
    vs = None if batch.var_scales is None else batch.var_scales[i]
    old_m = codec.decode_mean(batch.means[i], ms, fmt, shape)
    old_v = codec.decode_var(batch.vars[i], vs, fmt, shape)
    m, v = moments(batch.grads[i], old_m, old_v, batch.scalars[i], w.dtype, batch.rescale)
    mq, ms = codec.encode_mean(m, fmt)
    vq, vs = codec.encode_var(v, fmt, t, batch.dither_offsets()[i])
    if fmt in codec.BLOCKED:
        g = blocked_direction(mq, ms, vq, vs, fmt, w, batch.scalars[i], bias)
    else:
        g = (factored_direction if fmt in codec.FACTORED else direction)(
            codec.decode_mean(mq, ms, fmt, shape), codec.decode_var(vq, vs, fmt, shape), w, batch.scalars[i], bias)
    return g, (mq, ms, vq, vs)


def bias_factors(a: torch.Tensor, b: torch.Tensor, sc: Phase1Scalars,
                 bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a', s') = (RN32(float64(a) / bias1), sqrt(RN32(b / bias2)))`` (float32, ``a``/``b``'s shape; without
    bias correction ``(a, sqrt(b))``): the factors the lean update applies to the mean and to the square root of
    the second moment.  ``bias``: as in :func:`direction`."""
    if sc.bias1 is not None:
        bias1, bias2 = (sc.bias1, sc.bias2) if bias is None else (bias[0], bias[1].to(torch.float32))
        a = (a.to(torch.float64) / bias1).to(torch.float32)
        b = b / bias2
    return a, ieee_sqrt(b)


def blocked_direction(mq: torch.Tensor, ms: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor, fmt: str,
                      w: torch.Tensor, sc: Phase1Scalars, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`direction` of the moments that blocked codes hold (float32, ``w``'s shape), with the bias
    corrections and the square root applied once per block (the codec's specification)::

        u = ((t_m * |t_m|) * a') / ((t_v * t_v) * s' + eps) + w * wd,
        a' = RN32(float64(a) / bias1),   s' = sqrt(RN32(b / bias2))

    ``bias``: as in :func:`direction`."""
    a, s = bias_factors(ms, vs, sc, bias)
    shape = w.shape
    num = codec.scale_blocks(codec.mean_unit(mq, fmt, shape), a, fmt)
    den = codec.scale_blocks(codec.var_root_unit(vq, fmt, shape), s, fmt)
    return num / (den + sc.epsilon) + w * sc.wd


def factored_direction(m: torch.Tensor, v: torch.Tensor, w: torch.Tensor, sc: Phase1Scalars,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`direction` of ``"bf16"`` moments (float32 ``m``, ``v``, ``w``), with the bias corrections as two
    per-tensor factors (the codec's specification; :func:`blocked_direction` with one block of scales 1)::

        u = (m * a') / (sqrt(v) * s' + eps) + w * wd,
        a' = RN32(1 / bias1),   s' = sqrt(RN32(1 / bias2))

    ``bias``: as in :func:`direction`."""
    one = torch.ones((), dtype=torch.float32, device=m.device)
    a, s = bias_factors(one, one, sc, bias)
    return (m * a) / (ieee_sqrt(v) * s + sc.epsilon) + w * sc.wd


def _lean_phase1_batch(batch: LambBatch, dry: bool) -> Phase1Result:
    n = len(batch.weights)
    device = batch.weights[0].device if n else torch.device("cpu")
    sumsq = torch.empty(3 if dry else 2, n, dtype=torch.float64, device=device)
    dev = batch.on_device
    rows = dev.bias_rows() if dev is not None else None
    counts = batch.step_counts()
    directions, pending, weights = [], [], []
    for i in range(n):
        w = lean_weight(batch, i)
        g, state = lean_update(batch, i, w, counts[i], None if rows is None else rows[i])
        if dry or dev is not None:
            pending.append(state)
        else:
            _write_lean_state(batch, i, state, lambda dst, new: dst.copy_(new))
        if dry:
            sumsq[2, i] = sum_of_squares(batch.grads[i])
        directions.append(g)
        weights.append(w)
        sumsq[0, i] = sum_of_squares(w)
        sumsq[1, i] = sum_of_squares(g)
    return Phase1Result(sumsq=sumsq, carry=(directions, pending, weights), dry=dry)


def _write_lean_state(batch: LambBatch, i: int, state: tuple, put) -> None:
    mq, ms, vq, vs = state
    put(batch.means[i], mq)
    put(batch.vars[i], vq)
    if ms is not None:
        put(batch.mean_scales[i], ms)
        put(batch.var_scales[i], vs)


def _lean_phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    directions, pending, weights = p1.carry
    dev = batch.on_device
    if dev is None:
        def put(dst: torch.Tensor, new: torch.Tensor) -> None:
            dst.copy_(new)
    else:
        def put(dst: torch.Tensor, new: torch.Tensor) -> None:
            dst.copy_(torch.where(dev.skip, dst, new.to(dst.dtype)))
    for i, state in enumerate(pending):
        _write_lean_state(batch, i, state, put)
    for i, (g, w) in enumerate(zip(directions, weights)):
        new = w - steps[i].to(g.dtype) * g
        comp = None if batch.comps is None else batch.comps[i]
        if comp is not None:
            p, c = codec.kahan_split(new, batch.weights[i].dtype)
            put(comp, c)
            put(batch.outs[i], p)
            continue
        if batch.masters[i] is not None:
            put(batch.masters[i], new)
        put(batch.outs[i], new)
    if dev is not None:
        dev.advance()


def phase1_batch(batch: LambBatch, dry: bool = False) -> Phase1Result:
    """Phase 1 for every tensor of ``batch`` and the local squared norms (carry: the directions,
    and with ``dry`` the new moments, written only in phase 2)."""
    if batch.lean:
        return _lean_phase1_batch(batch, dry)
    n = len(batch.weights)
    device = batch.weights[0].device if n else torch.device("cpu")
    directions, pending = [], []
    sumsq = torch.empty(3 if dry else 2, n, dtype=torch.float64, device=device)
    dev = batch.on_device
    rows = dev.bias_rows() if dev is not None else None
    for i in range(n):
        w = batch.decay_source(i)
        if dry or dev is not None:  # moments written in phase 2 (a capturable step: written unless skipped)
            m, v = moments(batch.grads[i], batch.means[i], batch.vars[i], batch.scalars[i],
                           compute_dtype(w.dtype), batch.rescale)
            g = direction(m, v, w, batch.scalars[i], None if rows is None else rows[i])
            pending.append((m, v))
            if dry:
                sumsq[2, i] = sum_of_squares(batch.grads[i])
        else:
            g = phase1(w, batch.grads[i], batch.means[i], batch.vars[i], batch.scalars[i], batch.rescale)
        directions.append(g)
        sumsq[0, i] = sum_of_squares(w)
        sumsq[1, i] = sum_of_squares(g)
    return Phase1Result(sumsq=sumsq, carry=(directions, pending), dry=dry)


def phase2_batch(batch: LambBatch, p1: Phase1Result, steps: torch.Tensor) -> None:
    """Phase 2 for every tensor of ``batch`` with per-tensor step sizes ``steps`` (after a dry
    phase 1, the moments it computed are written first)."""
    if batch.lean:
        _lean_phase2_batch(batch, p1, steps)
        return
    directions, pending = p1.carry
    dev = batch.on_device
    if dev is not None:
        _phase2_unless_skipped(batch, directions, pending, steps, dev.skip)
        dev.advance()
        return
    for i, (m, v) in enumerate(pending):
        batch.means[i].copy_(m)
        batch.vars[i].copy_(v)
    for i, g in enumerate(directions):
        phase2(batch.decay_source(i), g, steps[i].to(g.dtype), batch.outs[i], batch.masters[i])


def _phase2_unless_skipped(batch: LambBatch, directions: list, pending: list, steps: torch.Tensor,
                           skip: torch.Tensor) -> None:
    """Phase 2 of a capturable batch: every write is ``where(skip, old, new)``."""
    def put(dst: torch.Tensor, new: torch.Tensor) -> None:
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))

    for i, ((m, v), g) in enumerate(zip(pending, directions)):
        put(batch.means[i], m)
        put(batch.vars[i], v)
        w = batch.decay_source(i)
        new = w.to(g.dtype) - steps[i].to(g.dtype) * g
        if batch.masters[i] is not None:
            put(batch.masters[i], new)
        put(batch.outs[i], new)


def lamb_step(batch: LambBatch, reducer: NormReducer = local_reducer, *, dry: bool = False) -> StepResult:
    """One fused LAMB step over ``batch`` (see :class:`~mplamb.kernels.contract.LambBatch`).

    Phase 1 for every tensor, then all squared norms reduced by ``reducer`` at once,
    then phase 2 for every tensor.
    """
    return run_step(sys.modules[__name__], batch, reducer, dry=dry)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], memo: Optional[dict] = None) -> torch.Tensor:
    """Per-tensor ``sum(grad**2)`` in float64, shape ``(n,)``, on the grads' device (``memo``: unused)."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([sum_of_squares(g) for g in grads])
