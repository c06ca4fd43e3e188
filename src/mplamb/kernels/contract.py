"""The contract every backend implements: one fused LAMB step over a batch of tensors.

A backend provides two halves of a step:

* ``phase1_batch(batch, dry=False) -> Phase1Result``: phase 1 on every tensor, in place, and
  the local squared norms ``[||w_i||^2, ||g_i||^2]`` as a ``(2, n)`` float64 tensor;
* ``phase2_batch(batch, p1, steps)``: phase 2 with the per-tensor step sizes.

A *dry* phase 1 (``dry=True``) mutates nothing: it computes the new moments and the
directions only to sum their squares, and adds a third row, the raw gradients' squared
norms ``||grad_i||^2``.  Its phase 2 then recomputes the moments (bitwise the same values)
and writes them with the weights.  The optimizer uses it for sharded parameters: one
all-reduce of all three rows then gives the trust ratios *and* the agreed non-finite skip
before anything has been written, so a step costs a single collective.

A backend may also split phase 1 into its host preparation and its launch:
``plan_phase1(batch, dry=False)`` does the first (addresses, tables, uploads; nothing the
step writes) and returns a callable that does the second.  The optimizer prepares phase 1
before its one host synchronisation of a step (the non-finite skip) and launches it after,
so on a GPU the device does not wait for the host's preparation; :func:`plan_phase1` falls
back to ``phase1_batch`` for backends without the split.

Between them the caller reduces the squared norms (identity on one process; one
all-reduce of partial norms when tensors are shards, for every batch that shares a
process group at once) and turns them into step sizes with :func:`finish_norms`.
:func:`run_step` composes the three for a single batch; it is each backend's ``lamb_step``.

A *capturable* batch (``batch.on_device``, a :class:`DeviceScalars`) takes the scalars that
change from step to step from device tensors instead of the host: each tensor's step count
(and from it the bias corrections), the learning rate, and a skip flag with which the whole
step writes nothing (moments, weights, masters, outputs and counts stay bitwise as they were).
Phase 2 of such a batch also advances the step counts.  Nothing in such a step waits for the
device, so it can be captured in a CUDA graph.

A *lean* batch (``batch.lean``) keeps its moments in a storage format of :mod:`.codec` (``means``
and ``vars`` then hold codes, ``mean_scales``/``var_scales`` their block scales) and/or Kahan
compensations (``comps``) instead of float32 masters.  Backends that step it with the reference's
math (bit-identical) say ``LEAN = True``; the optimizer gives lean batches to no other backend.

Inputs are validated by the caller (``mplamb.ops`` or ``mplamb.Lamb``) before a
backend is called; backends never validate and never allocate state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .._scalars import Phase1Scalars, step_sizes

__all__ = ["DeviceScalars", "LambBatch", "StepResult", "Phase1Result", "NormReducer", "local_reducer", "step_sizes_for",
           "finish_norms", "plan_phase1", "run_step"]

NormReducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Phase1Result:
    """Local squared norms ``(2, n)`` float64 (``(3, n)`` with the gradients' row when ``dry``), and
    whatever the backend's phase 2 needs (``carry``)."""

    sumsq: torch.Tensor
    carry: Any = None
    dry: bool = False


def local_reducer(sumsq: torch.Tensor) -> torch.Tensor:
    """The reducer for unsharded tensors: the local sums of squares are the whole norms."""
    return sumsq


@dataclass
class DeviceScalars:
    """The per-step scalars of a capturable batch, as device tensors the host never reads.

    ``steps[i]``: tensor ``i``'s step count before this step (a 0-d float32 tensor; the
    optimizer's ``state["step"]``); the step is ``t = steps[i] + 1``, and its bias corrections are
    row ``min(t, T)`` of ``bias`` (:func:`mplamb._scalars.bias_table`, ``(T + 1, 4)`` float64:
    ``bias1, bias2, 1/bias1, 1/bias2``), replacing those of ``scalars[i]``.  ``lr``: a 0-d float64
    tensor, the learning rate of every tensor (replacing ``lrs``).  ``skip``: a 0-d bool tensor;
    when True the step writes nothing at all.  Phase 2 adds ``1 - skip`` to every count.
    """

    steps: List[torch.Tensor]
    bias: torch.Tensor
    lr: torch.Tensor
    skip: torch.Tensor

    def bias_rows(self) -> torch.Tensor:
        """``(n, 4)`` float64: each tensor's bias-correction row for this step (no host sync)."""
        t = torch.stack(self.steps).to(torch.int64) + 1 if len(self.steps) else torch.zeros(0, dtype=torch.int64)
        return self.bias.index_select(0, torch.clamp(t, max=self.bias.shape[0] - 1))

    def advance(self) -> None:
        """Every count plus one, unless the step is skipped."""
        keep = (~self.skip).to(torch.float32)
        for count in self.steps:  # (torch._foreach_add_ with a tensor reads it on the host on CPU)
            count.add_(keep)


@dataclass
class LambBatch:
    """The tensors and per-tensor scalars of one fused step (all on one device).

    ``weights[i]`` is the model tensor (float16/bfloat16/float32/float64).  When
    ``masters[i]`` is a float32 master weight, phase 1 decays and phase 2 updates the
    master, and ``outs[i]`` receives the rounded master; otherwise the weight itself is
    read and the new value written to ``outs[i]`` (which may be ``weights[i]``).
    ``means``/``vars`` hold the moments: float32 with a master; otherwise the weight
    dtype (the operators) or float32 (the optimizer keeps float32 moments for half
    weights without masters).  Arithmetic is in the compute dtype of the decay source.
    ``lrs`` are per-tensor learning rates; ``adapt[i]`` False turns the trust ratio off.
    ``rescale`` (a 0-d float32 tensor) replaces every ``scalars[i].rescale`` when set.
    ``memo`` is a dict the caller keeps from step to step for batches of the same tensors: a
    backend may remember there what it derived from ``means``, ``vars`` and ``masters`` (their
    addresses, say), which the caller owns and never re-points in place; it must check that
    the tensors are the same objects before reusing anything.
    """

    weights: List[torch.Tensor]
    grads: List[torch.Tensor]
    means: List[torch.Tensor]
    vars: List[torch.Tensor]
    masters: List[Optional[torch.Tensor]]
    outs: List[torch.Tensor]
    scalars: List[Phase1Scalars]
    lrs: Sequence[float]
    adapt: Optional[Sequence[bool]] = None
    lower_bound: Optional[float] = None
    upper_bound: Optional[float] = None
    max_trust_ratio: Optional[float] = None
    rescale: Optional[torch.Tensor] = None
    uniform: bool = False  # a promise that every tensor list has one dtype and masters are all set or all None
    memo: Optional[Dict[str, Any]] = None
    on_device: Optional[DeviceScalars] = None  # a capturable batch: step counts, lr and skip on the device
    # lean state (:mod:`.codec`): the moments' storage format, their block scales, Kahan compensations
    moment_format: str = "fp32"  # one format for every tensor of the batch
    mean_scales: Optional[List[Optional[torch.Tensor]]] = None
    var_scales: Optional[List[Optional[torch.Tensor]]] = None
    comps: Optional[List[Optional[torch.Tensor]]] = None  # Kahan compensations (the weight's dtype), or None
    counts: Optional[Sequence[int]] = None  # each tensor's step t (host; the dither seed of lean formats)
    offsets: Optional[Sequence[int]] = None  # a shard's first element's index in its whole parameter (the dither's)

    @property
    def lean(self) -> bool:
        """Moments in a lean format or Kahan-compensated weights (:mod:`.codec`): the lean step."""
        return self.moment_format != "fp32" or self.comps is not None

    def step_counts(self) -> List[Any]:
        """Each tensor's step ``t`` of this step: host ints, or 0-d device tensors when capturable."""
        if self.on_device is not None:
            return [s + 1 for s in self.on_device.steps]
        return list(self.counts) if self.counts is not None else [0] * len(self.weights)

    def dither_offsets(self) -> List[int]:
        """Each tensor's first element's row-major index in its whole parameter (0 unless a shard of rows):
        the index base of the second moment's dither (:func:`.codec.dither`)."""
        return list(self.offsets) if self.offsets is not None else [0] * len(self.weights)

    def decay_source(self, i: int) -> torch.Tensor:
        """The weight phase 1 decays and phase 2 updates: the master if any, else the weight."""
        m = self.masters[i]
        return self.weights[i] if m is None else m

    def select(self, idx: List[int]) -> "LambBatch":
        """The batch of tensors ``idx`` only (same scalars, bounds and rescale; no memo)."""
        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        dev = self.on_device
        if dev is not None:
            dev = DeviceScalars(steps=pick(dev.steps), bias=dev.bias, lr=dev.lr, skip=dev.skip)
        return LambBatch(weights=pick(self.weights), grads=pick(self.grads), means=pick(self.means),
                         vars=pick(self.vars), masters=pick(self.masters), outs=pick(self.outs),
                         scalars=pick(self.scalars), lrs=pick(list(self.lrs)), adapt=pick(self.adapt),
                         lower_bound=self.lower_bound, upper_bound=self.upper_bound,
                         max_trust_ratio=self.max_trust_ratio, rescale=self.rescale, uniform=self.uniform,
                         on_device=dev, moment_format=self.moment_format, mean_scales=pick(self.mean_scales),
                         var_scales=pick(self.var_scales), comps=pick(self.comps), counts=pick(self.counts),
                         offsets=pick(self.offsets))

    def compute_dtypes(self) -> List[torch.dtype]:
        """Per-tensor arithmetic dtype: float64 for float64 decay sources, float32 otherwise."""
        f64 = torch.float64
        if self.uniform and self.weights:
            m0 = self.masters[0]
            return [f64 if (self.weights[0] if m0 is None else m0).dtype == f64 else torch.float32] * len(self.weights)
        return [f64 if (w if m is None else m).dtype == f64 else torch.float32
                for w, m in zip(self.weights, self.masters)]


@dataclass
class StepResult:
    """What a step reports, as device tensors (no host synchronisation).

    ``sumsq[0]``/``sumsq[1]``: reduced squared norms of the weights and of the updates;
    ``step_sizes``: the per-tensor step actually applied (``lr * trust ratio``), float64;
    ``trust_ratios``: the step with ``lr = 1`` (1 where the plain lr applies), float64.
    """

    sumsq: torch.Tensor
    step_sizes: torch.Tensor
    trust_ratios: torch.Tensor

    @property
    def weight_norms(self) -> torch.Tensor:
        return torch.sqrt(self.sumsq[0])

    @property
    def update_norms(self) -> torch.Tensor:
        return torch.sqrt(self.sumsq[1])


def step_sizes_for(batch: LambBatch, sumsq: torch.Tensor) -> torch.Tensor:
    """Per-tensor step sizes and trust ratios from reduced norms: a ``(2, n)`` float64 tensor holding
    compute-dtype values, row 0 the step sizes, row 1 the trust ratios (the step with every lr taken
    as 1; 1 where the plain lr applies).

    Norms are ``sqrt`` of the float64 sums, rounded once to each tensor's compute dtype; the
    trust-ratio rule is :func:`mplamb._scalars.step_sizes` evaluated in that dtype on both rows at
    once, so float32 tensors get exactly MXNet's float32 ``(lr * r1) / r2``.
    """
    norms = torch.sqrt(sumsq)
    dtypes = batch.compute_dtypes()
    n = len(batch.weights)
    if batch.on_device is not None:  # the lr on the device: no upload
        lrs = torch.ones(2, n, dtype=torch.float64, device=sumsq.device)
        lrs[0] = batch.on_device.lr.to(sumsq.device, torch.float64).to(torch.float32)  # float32 value (MXNet's rule)
    else:
        lrs = torch.ones(2, n, dtype=torch.float64)
        lrs[0] = torch.tensor(list(batch.lrs), dtype=torch.float64).to(torch.float32)  # float32 values (MXNet's rule)
        lrs = lrs.to(sumsq.device, non_blocking=True)
    adapt = True
    if batch.adapt is not None and not any(batch.adapt):
        adapt = False
    elif batch.adapt is not None and not all(batch.adapt):
        adapt = torch.tensor(list(batch.adapt), dtype=torch.bool).to(sumsq.device, non_blocking=True)
    result = None
    for dtype in sorted(set(dtypes), key=str):
        steps = step_sizes(
            lrs.to(dtype),
            norms[0].to(dtype),
            norms[1].to(dtype),
            lower_bound=batch.lower_bound,
            upper_bound=batch.upper_bound,
            max_trust_ratio=batch.max_trust_ratio,
            adapt=adapt,
        ).to(torch.float64)
        if result is None:
            result = steps
        else:
            mask = torch.tensor([d == dtype for d in dtypes], device=sumsq.device)  # mixed dtypes only
            result = torch.where(mask, steps, result)
    return result


def finish_norms(batch: LambBatch, sumsq: torch.Tensor, reducer: NormReducer) -> tuple:
    """Reduce the local squared norms and turn them into step sizes and trust ratios.

    The one piece of the step between the phases that every backend shares.
    """
    sumsq = reducer(sumsq)
    both = step_sizes_for(batch, sumsq)
    return sumsq, both[0], both[1]


def plan_phase1(backend: Any, batch: LambBatch, dry: bool = False) -> Callable[[], Phase1Result]:
    """Phase 1 of ``batch`` on ``backend`` as a prepared launch: the backend's ``plan_phase1``
    (host work done now, nothing written until the returned callable runs), or ``phase1_batch``
    deferred whole."""
    plan = getattr(backend, "plan_phase1", None)
    if plan is not None:
        return plan(batch, dry=dry)
    return lambda: backend.phase1_batch(batch, dry=dry)


def run_step(backend: Any, batch: LambBatch, reducer: NormReducer = local_reducer, *,
             dry: bool = False) -> StepResult:
    """One whole step of ``backend`` over ``batch``: phase 1, reduced norms, phase 2.

    ``dry=True`` runs the dry phase 1 (same result; the moments are written in phase 2).
    """
    p1 = backend.phase1_batch(batch, dry=dry)
    sumsq, steps, ratios = finish_norms(batch, p1.sumsq[:2], reducer)
    backend.phase2_batch(batch, p1, steps)
    return StepResult(sumsq=sumsq, step_sizes=steps, trust_ratios=ratios)
