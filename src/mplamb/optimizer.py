"""``mplamb.Lamb``: a ``torch.optim.Optimizer`` for real mixed-precision LAMB training.

The stateful shell around the kernels: param groups, lazy state, fp32 master weights,
global-norm clipping, the loss-scale hand-off and the non-finite skip, telemetry and
the ``state_dict`` policy.  It contains no elementwise math: every step is one
``lamb_step`` of a backend of :mod:`mplamb.kernels` per batch of like tensors.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.optim import Optimizer

from ._scalars import Phase1Scalars, bias_table, compute_dtype, phase1_scalars
from ._validate import check_beta, check_real
from .distributed import DTensor, all_reduce_sum, local, shard_group
from .lean_state import check_storage, convert, dither_offset, init_state, param_storage, state_memory
from .kernels import codec
from .kernels import (BACKENDS, DeviceScalars, LambBatch, StepResult, choose_backend, finish_norms, get_backend,
                      local_reducer, plan_phase1)

__all__ = ["Lamb"]


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _check_optional_positive(name: str, value: object, hint: str = "") -> Optional[float]:
    v = check_real(name, value, allow_none=True)
    if v is not None and v <= 0:
        raise ValueError(f"{name}: expected None or a number > 0, got {v}{hint}")
    return v


def check_group(group: Dict[str, Any]) -> None:
    """Validate the hyper-parameters of one param group (raises, naming the argument)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element (lr: got shape {tuple(lr.shape)})")
        lr = lr.item()
    check_real("lr", lr, minimum=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])
    check_real("eps", group["eps"], minimum=0.0)
    check_real("weight_decay", group["weight_decay"], minimum=0.0)
    for flag in ("bias_correction", "grad_averaging", "layer_adaptation"):
        _check_flag(flag, group[flag])
    _check_optional_positive("max_grad_norm", group["max_grad_norm"])
    _check_optional_positive("clip_gradient", group["clip_gradient"], " (use None to turn clipping off)")
    rg = check_real("rescale_grad", group["rescale_grad"])
    if rg <= 0:
        raise ValueError(f"rescale_grad: expected a number > 0, got {rg}")
    for name in ("lower_bound", "upper_bound"):
        _check_optional_positive(name, group[name], " (use None for no bound)")
    _check_optional_positive("max_trust_ratio", group["max_trust_ratio"])
    check_storage(group)
    for name in ("capturable", "foreach", "fused"):
        if group[name] is not None and not isinstance(group[name], bool):
            raise TypeError(f"{name}: expected None or a bool, got {type(group[name]).__name__}")
    _check_flag("maximize", group["maximize"])
    if _check_flag("differentiable", group["differentiable"]):
        raise RuntimeError("differentiable=True is not supported: Lamb steps in fused kernels that autograd does "
                           "not see (use differentiable=False)")
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    backend = group["backend"]
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if backend != "auto" and (group["fused"] or group["foreach"]):
        flag = "fused" if group["fused"] else "foreach"
        raise ValueError(f"{flag}=True: conflicts with backend={backend!r} (the keyword picks the backend; "
                         "leave backend='auto')")


@dataclass
class _Work:
    """The parameters of one group that step together: one device, one dtype (and one grad dtype)."""

    group: Dict[str, Any]
    params: List[torch.Tensor]
    master: bool
    fmt: str = "fp32"  # the moments' storage format (lean_state.param_storage)
    kahan: bool = False  # Kahan-compensated weights instead of masters
    group_pg: Any = None  # the process group summing partial norms (None: norms are whole)
    dtensor: bool = False  # DTensor parameters: kernels see their local shards
    backend: Any = None
    grad_sumsq: Optional[torch.Tensor] = None
    states: List[Dict[str, Any]] = None  # type: ignore[assignment]
    memo: Optional[Dict[str, Any]] = None  # the backend's memo for this work's state tensors (LambBatch.memo)
    grads: List[torch.Tensor] = None  # type: ignore[assignment]  # this step's gradients (local shards), one list
    fresh: List[torch.Tensor] = None  # type: ignore[assignment]  # the parameters whose state this step created
    capturable: bool = False  # step counts, lr and the skip decision on the device (no host synchronisation)
    counts: Optional[torch.Tensor] = None  # host flow: the work's step counts, of which each state["step"] is a view


_KEYWORD_DEFAULTS = {"moments": "fp32", "capturable": None, "foreach": None, "fused": None, "maximize": False, "differentiable": False}


class _Shared:
    """A process group carried through ``copy.deepcopy`` as the same object (a communicator cannot be
    copied), and through ``pickle`` only when it is ``None`` or ``"world"`` (a name that means the same
    group in the process that loads it)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self

    def __reduce__(self) -> tuple:
        if self.obj is None or isinstance(self.obj, str):
            return (_Shared, (self.obj,))
        raise TypeError("Lamb: a process group cannot be pickled; pickle opt.state_dict() instead, or set "
                        "process_group / partition_group to None or 'world' first")

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.obj if isinstance(value, _Shared) else value


def _enclosing_zero_group() -> Optional[Any]:
    """The process group of the ``ZeroRedundancyOptimizer`` constructing this optimizer, if one is (its
    ``_init_local_optimizer`` calls the optimizer class with this rank's partition of the parameters)."""
    zero_module = sys.modules.get("torch.distributed.optim")  # imported already wherever ZeRO is in use
    zero_cls = getattr(zero_module, "ZeroRedundancyOptimizer", None)
    if zero_cls is None:
        return None
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, zero_cls):
            return owner.process_group if owner.process_group is not None else "world"
        frame = frame.f_back
    return None


def _step_counts_as(states: List[Dict[str, Any]], capturable: bool, device: torch.device,
                    memo: Dict[str, Any]) -> Optional[torch.Tensor]:
    """Every ``state["step"]`` as its work steps with it, a 0-d float32 tensor as torch's optimizers keep it.

    Capturable: a tensor of its own on ``device`` (the kernels read and advance it there).  Otherwise
    a 0-d view, on the CPU, of one float32 tensor holding the whole work's counts, which is returned: a
    step reads all counts with one ``tolist()`` and advances them with one ``add_`` instead of an
    operation per tensor.  A count loaded or made otherwise (an int, another tensor) is converted
    once; the counts found right are remembered in ``memo``, so a step checks them without a
    per-tensor Python loop.
    """
    counts = [st["step"] for st in states]
    held = memo.get("step_counts")
    if held is not None and len(held[0]) == len(counts) and all(map(operator.is_, held[0], counts)):
        return held[1]
    flat = None
    if capturable:
        for st in states:
            s = st["step"]
            if not isinstance(s, torch.Tensor) or s.device != device or s.dtype != torch.float32 or s.dim():
                st["step"] = torch.tensor(float(s), dtype=torch.float32, device=device)
    else:
        flat = torch.tensor([float(c) for c in counts], dtype=torch.float32)
        for st, view in zip(states, flat.unbind()):
            st["step"] = view
    memo["step_counts"] = ([st["step"] for st in states], flat)
    return flat


def _same_device_index(p: torch.Tensor, grad: torch.Tensor, index: int) -> bool:
    """``p`` and ``grad`` both on the CPU (``index`` -1), or both on CUDA device ``index``."""
    if index == -1:
        return p.is_cpu and grad.is_cpu
    return p.is_cuda and grad.is_cuda and p.get_device() == index and grad.get_device() == index


class Lamb(Optimizer):
    r"""LAMB (You et al., 2019) with fp32 master weights, loss scaling and MXNet-exact math.

    For every parameter :math:`w` with gradient :math:`\nabla` and its own step count
    :math:`t` (the parameter's own number of steps), with :math:`w` the fp32 master
    weight when there is one:

    .. math::
        \begin{aligned}
        s &= \mathrm{clip}\big(\nabla \cdot \rho \cdot \kappa,\ c\big)
            && \rho = \texttt{rescale\_grad} / \text{loss scale},\ \kappa = \text{global-norm clip factor} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) s,\qquad v \leftarrow \beta_2 v + (1-\beta_2) s^2
            && (1-\beta_1 \to 1 \text{ without grad\_averaging}) \\
        u &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda w
            && \text{(Adam direction, then decoupled decay)} \\
        r_1 &= \min(\max(\lVert w\rVert, \ell), h),\qquad r_2 = \lVert u \rVert
            && \text{(MXNet's bounds on the weight norm)} \\
        \eta &= \begin{cases} \gamma & r_1 = 0 \text{ or } r_2 = 0 \text{ or no layer adaptation} \\
                               \gamma \cdot \min(r_1 / r_2, \tau) & \text{otherwise} \end{cases}
            && \text{(trust ratio, capped by max\_trust\_ratio } \tau) \\
        w &\leftarrow w - \eta\, u,\qquad \text{param} \leftarrow \mathrm{dtype}(w)
        \end{aligned}

    with :math:`\kappa = \min(1, \texttt{max\_grad\_norm} / \lVert \nabla \rho \rVert_{\text{all params}})`.
    Elementwise arithmetic is float32 (float64 for float64 parameters), in exactly the
    order of MXNet's ``lamb_update_phase1``/``phase2`` (see :mod:`mplamb.ops`).

    Args (MXNet's ``mx.optimizer.LAMB`` name and the anchor each option comes from):
        params: parameters or param groups; every option below can be set per group.
        lr: learning rate :math:`\gamma` (MXNet ``learning_rate``).
        betas: :math:`(\beta_1, \beta_2)` (MXNet ``beta1``, ``beta2``).
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v}` (MXNet ``epsilon``; default 1e-6 as MXNet).
        weight_decay: :math:`\lambda`, decoupled, inside the trust ratio (MXNet ``wd``).
        bias_correction: divide the moments by :math:`1-\beta^t` (MXNet, Apex).
        grad_averaging: ``False`` accumulates :math:`m \leftarrow \beta_1 m + s` (Apex FusedLAMB).
        max_grad_norm: clip the global gradient norm over all parameters of this optimizer
            after unscaling (Apex, DeepSpeed, timm ``max_grad_norm``); ``None``: off.
        clip_gradient: clip each gradient element to :math:`[-c, c]` after rescaling
            (MXNet ``clip_gradient``); ``None``: off.
        rescale_grad: fixed gradient scale :math:`\rho` (MXNet ``rescale_grad``, e.g. 1/batch size).
        lower_bound, upper_bound: bounds :math:`\ell, h` on the weight norm :math:`r_1` (MXNet); ``None``: off.
        max_trust_ratio: cap :math:`\tau` on :math:`r_1/r_2` (DeepSpeed ``max_coeff``, timm ``trust_clip``).
        layer_adaptation: ``False`` uses the plain lr for the group (Apex ``use_nvlamb=False`` style
            exclusion, TF-Addons ``exclude_from_layer_adaptation``).
        master_weights: ``None``: fp32 masters for float16/bfloat16 parameters; ``False``: none
            (the half weight is updated directly; moments stay fp32); ``True``: as ``None``.
        backend: ``"auto"`` (fastest available for the device), ``"reference"`` or another name in
            :data:`mplamb.kernels.BACKENDS`.
        capturable: ``True``: the step makes no host synchronisation and can be captured in a CUDA
            graph: the non-finite skip is decided on the device (the kernels read the flag and write
            nothing when it is set), step counts and bias corrections live on the device, and the lr
            is read from a device tensor each step (pass ``lr=torch.tensor(..., device="cuda")`` and
            let the scheduler fill it in place to schedule a captured step).  ``None`` (default):
            ``True`` on CUDA, ``False`` elsewhere.  Needs a capturable backend (``triton``,
            ``reference``); a step skipped on the device keeps the state it created lazily (zeros,
            step 0), which is the same as none.
        foreach, fused: torch's keywords; with ``backend="auto"``, ``fused=True`` asks for the fused kernels
            of the device (``fused_cpu``, ``triton``), ``foreach=True`` for the ``torch._foreach_*`` backend,
            ``False`` leaves that kind out of ``auto``'s choice.  ``None``: ``auto`` decides.
        maximize: maximise the objective (gradient ascent): every gradient is negated, exactly.
        differentiable: only ``False`` (the step runs in kernels autograd does not see).
        process_group: for plain tensors sharded by the user (every process holds a part of every
            parameter): the group over which partial norms are summed.  DTensor parameters (FSDP2)
            need nothing: their mesh says it.
        partition_group: for ZeRO-1, where each process steps different whole parameters: the group
            over which the global gradient norm and the non-finite skip are agreed.  A process group, or
            ``"world"`` (the default group) — pass the string through ``ZeroRedundancyOptimizer(...,
            optimizer_class=Lamb, partition_group="world")``, which copies its keyword arguments into
            param groups that must stay picklable (or set ``zero.optim.partition_group = group``).

    State (``opt.state[p]``): ``step`` (a 0-d float32 tensor, as torch's optimizers keep it: on the CPU,
    or on the parameter's device when capturable), ``exp_avg`` (m), ``exp_avg_sq`` (v), and
    ``master_weight`` (fp32) for parameters with a master.  Moments are fp32 for half parameters.

    Loss scaling: works with ``torch.amp.GradScaler`` (``scaler.step(opt)``); the optimizer takes
    the scale into its kernels (the ``.grad`` tensors are never modified by it) and clips after
    unscaling.  A step with any non-finite gradient is skipped entirely: parameters, masters,
    moments and step counts stay bitwise unchanged and :attr:`skipped_steps` counts it.  The
    decision costs one host synchronisation per step (free on CPU), none when capturable (then
    :attr:`skipped_steps` and :attr:`last_grad_norm` are device tensors until read).

    Example:
        >>> model = torch.nn.Linear(4, 2).to(torch.bfloat16)
        >>> opt = Lamb(model.parameters(), lr=1e-2, weight_decay=0.01)
        >>> model(torch.randn(3, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["master_weight"].dtype
        torch.float32
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf instead of unscaling .grad

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: Optional[float] = None,
        clip_gradient: Optional[float] = None,
        rescale_grad: float = 1.0,
        lower_bound: Optional[float] = None,
        upper_bound: Optional[float] = None,
        max_trust_ratio: Optional[float] = None,
        layer_adaptation: bool = True,
        master_weights: Optional[Union[bool, str]] = None,
        moments: str = "fp32",
        backend: str = "auto",
        capturable: Optional[bool] = None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        process_group: Optional[Any] = None,
        partition_group: Optional[Any] = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps=eps,
            weight_decay=weight_decay, bias_correction=bias_correction, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, clip_gradient=clip_gradient, rescale_grad=rescale_grad,
            lower_bound=lower_bound, upper_bound=upper_bound, max_trust_ratio=max_trust_ratio,
            layer_adaptation=layer_adaptation, master_weights=master_weights, moments=moments, backend=backend,
            capturable=capturable, foreach=foreach, fused=fused, maximize=maximize, differentiable=differentiable,
        )
        check_group(defaults)
        self.process_group = process_group
        if partition_group is None and process_group is None:
            # built by ZeroRedundancyOptimizer for this rank's partition: clipping and the skip must be agreed
            # over its group (each rank holds other parameters), which the optimizer cannot see otherwise
            partition_group = _enclosing_zero_group()
        self.partition_group = partition_group
        self._init_counters()
        super().__init__(params, defaults)

    def _init_counters(self) -> None:
        self._skipped_on_device: Optional[torch.Tensor] = None  # skips decided on the device (capturable steps)
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._last: List[Tuple[List[torch.Tensor], StepResult]] = []
        self._memo: Dict[tuple, Dict[str, Any]] = {}  # per work key: backends' memo of the state tensors

    def __getstate__(self) -> Dict[str, Any]:
        """torch's optimizer state (defaults, state, param groups) plus what a copy needs to go on: the
        process groups (shared by a deep copy, not copied; a pickle keeps them only when None or
        ``"world"``) and the skip counters.  Backend memos and the last step's telemetry start afresh."""
        state = super().__getstate__()
        state["_mplamb"] = {"process_group": _Shared(self.process_group),
                            "partition_group": _Shared(self.partition_group),
                            "skipped": self._skipped, "skipped_on_device": self._skipped_on_device,
                            "last_grad_norm": self.last_grad_norm}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        extra = state.get("_mplamb") or {}
        super().__setstate__({k: v for k, v in state.items() if k != "_mplamb"})
        for key, value in _KEYWORD_DEFAULTS.items():  # optimizers pickled before these keywords existed
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)
        if "_mplamb" not in state and hasattr(self, "_memo"):
            return  # (torch's load_state_dict calls __setstate__ on a live optimizer: it keeps its own)
        self._init_counters()
        self.process_group = _Shared.unwrap(extra.get("process_group"))
        self.partition_group = _Shared.unwrap(extra.get("partition_group"))
        self._skipped = int(extra.get("skipped", 0))
        self._skipped_on_device = extra.get("skipped_on_device")
        self.last_grad_norm = extra.get("last_grad_norm")

    @property
    def _skipped(self) -> int:
        """Skips decided on the host, kept in the live ``param_groups[0]["skipped_steps"]``: what torch's
        state-dict protocol carries, and what ``ZeroRedundancyOptimizer`` copies between its own param groups
        and this optimizer's (its checkpoints never call this optimizer's ``state_dict``)."""
        groups = self.__dict__.get("param_groups") or [{}]
        return int(groups[0].get("skipped_steps", 0))

    @_skipped.setter
    def _skipped(self, value: int) -> None:
        if self.__dict__.get("param_groups"):
            self.param_groups[0]["skipped_steps"] = int(value)

    @property
    def skipped_steps(self) -> Any:
        """Steps skipped for a non-finite gradient: an int, or a 0-d int64 device tensor once capturable
        steps have run (reading it, e.g. ``int(opt.skipped_steps)``, waits for the device)."""
        if self._skipped_on_device is None:
            return self._skipped
        return self._skipped_on_device + self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped, self._skipped_on_device = int(value), None

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group; its options are validated (with the defaults filled in) first."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        full = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_group(full)
        if "betas" in param_group and isinstance(param_group["betas"], list):
            param_group = {**param_group, "betas": tuple(param_group["betas"])}
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:  # a tensor, or a (name, tensor) pair (named parameters, as torch.optim takes them)
            t = p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"params: expected floating-point tensors (or (name, tensor) pairs), got "
                                f"{getattr(t, 'dtype', type(t))}")
        super().add_param_group({**param_group, "params": params})

    # ------------------------------------------------------------------ step

    def _collect(self) -> List[_Work]:
        """Validate every gradient and group the parameters that step together.  Mutates nothing.

        A parameter with the dtypes, class and device of the one before it joins that one's work
        without the full lookup (the usual case: one work per group); its gradient is validated
        all the same.
        """
        works: Dict[tuple, _Work] = {}
        strided = torch.strided
        for gi, group in enumerate(self.param_groups):
            lean = group["moments"] != "fp32" or group["master_weights"] == "kahan"
            work = None  # the previous parameter's work, and what it was keyed on:
            last_dtype = last_gdtype = last_type = last_index = last_storage = None  # (dtype, grad dtype, class,
            # CPU/CUDA index, storage)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout is not strided or grad.shape != p.shape:
                    self._reject_grad(p, grad)
                dtype, gdtype = p.dtype, grad.dtype
                storage = param_storage(group, p) if lean else None  # (the blocked formats depend on the size)
                if (work is not None and dtype is last_dtype and gdtype is last_gdtype and type(p) is last_type
                        and storage == last_storage and _same_device_index(p, grad, last_index)):
                    work.params.append(p)
                    work.grads.append(grad)
                    continue
                device = p.device
                if grad.device != device or not gdtype.is_floating_point:
                    self._reject_grad(p, grad)
                if device.type == "meta":
                    raise RuntimeError("Lamb cannot step parameters on the meta device (they hold no values): "
                                       "materialise them first, e.g. model.to_empty(device=...)")
                sharded = isinstance(p, DTensor)
                pg = shard_group(p, self.process_group) if sharded else self.process_group
                key = (gi, device, dtype, gdtype, pg, sharded, storage)
                work = works.get(key)
                if work is None:
                    fmt, master, kahan = storage or param_storage(group, p)
                    work = works[key] = _Work(group=group, params=[], master=master, fmt=fmt, kahan=kahan,
                                              group_pg=pg, dtensor=sharded, memo=self._memo.setdefault(key, {}),
                                              grads=[])
                work.params.append(p)
                work.grads.append(grad)
                # the fast path above: plain tensors on the CPU or CUDA (a sharded one's group may differ)
                fast = not sharded and device.type in ("cpu", "cuda")
                last_dtype, last_gdtype, last_type = (dtype, gdtype, type(p)) if fast else (None, None, None)
                last_index = -1 if device.type == "cpu" else device.index
                last_storage = storage
        out = list(works.values())
        for w in out:
            self._choose_backend(w)
            if w.dtensor:  # the kernels see local shards
                w.grads = [local(g) for g in w.grads]
        return out

    @staticmethod
    def _choose_backend(work: _Work) -> None:
        """The work's backend, and whether it steps capturably (``capturable`` None: on CUDA, where a
        capturable backend exists)."""
        g, device = work.group, work.params[0].device
        wanted = g["capturable"]
        if wanted is None and device.type != "cuda":
            wanted = False
        name, work.capturable = choose_backend(g["backend"], device, fused=g["fused"], foreach=g["foreach"],
                                               capturable=wanted)
        work.backend = get_backend(name, device)
        if (work.fmt != "fp32" or work.kahan) and not getattr(work.backend, "LEAN", False):
            if g["backend"] != "auto" or g["fused"] or g["foreach"]:
                asked = g["backend"] if g["backend"] != "auto" else ("fused" if g["fused"] else "foreach")
                raise ValueError(f"moments={g['moments']!r}, master_weights={g['master_weights']!r}: backend "
                                 f"{asked!r} has no kernels for lean state; use backend='auto' or 'reference'")
            work.backend = get_backend("reference", device)

    @staticmethod
    def _reject_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError("Lamb does not support sparse gradients (the trust ratio needs the "
                               "whole gradient); use dense gradients, e.g. nn.Embedding(sparse=False)")
        if grad.shape != p.shape:
            raise ValueError(f"grad: expected the parameter's shape {tuple(p.shape)}, got {tuple(grad.shape)}")
        if grad.device != p.device:
            raise ValueError(f"grad: expected the parameter's device {p.device}, got {grad.device}")
        raise TypeError(f"grad: expected a floating-point gradient, got {grad.dtype}")


    def _amp(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The inverse loss scale and found-inf flag GradScaler handed over, if any."""
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv = None if scale is None else torch.reciprocal(scale.to(torch.float64))
        return inv, found_inf

    @staticmethod
    def _reduce(works: List[_Work], parts: List[torch.Tensor]) -> List[torch.Tensor]:
        """Sum each work's partial norms ``parts[i]`` (shape ``(..., n_i)``) over its process group:
        one all-reduce per group for all works that share it."""
        by_group: Dict[Any, List[int]] = {}
        for i, w in enumerate(works):
            if w.group_pg is not None:
                by_group.setdefault(w.group_pg, []).append(i)
        out = list(parts)
        for pg, idx in by_group.items():
            flat = all_reduce_sum(torch.cat([parts[i] for i in idx], dim=-1), pg)
            for i, piece in zip(idx, torch.split(flat, [parts[i].shape[-1] for i in idx], dim=-1)):
                out[i] = piece
        return out

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One LAMB step over every parameter with a gradient (skipped if any gradient is non-finite).

        Sharded parameters (DTensor, ``process_group``) cost **one** all-reduce per process group
        and step, whatever the number of parameters: phase 1 runs *dry* (nothing written), and one
        all-reduce of the weights', updates' and gradients' squared norms gives the trust ratios
        and an agreed non-finite skip before anything is written.  With ``max_grad_norm`` that
        holds while the gradient norm is within the limit; a step that does clip costs two (the
        clip factor scales the gradient before the moments, so the update norms computed with
        factor 1 are redone with it).  ZeRO's ``partition_group`` costs two: the gradient norm
        and the skip over the partition group first, then phase 1.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()
        if not works and self.partition_group is None:
            return loss
        inv_scale, found_inf = self._amp()
        anchor = works[0].params[0].device if works else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.float64, device=anchor)
        if found_inf is not None:
            bad = bad + (found_inf.to(anchor) > 0).to(torch.float64)
        try:
            if self.partition_group is None and any(w.group_pg is not None for w in works):
                self._step_dry(works, inv_scale, bad, anchor)
            else:
                self._step_plain(works, inv_scale, bad, anchor)
        except BaseException:
            self._drop_fresh_state(works)  # a step that failed leaves no half-made state
            raise
        return loss

    def _global_grad_sumsq(self, works: List[_Work], sumsqs: List[torch.Tensor], inv_scale: Optional[torch.Tensor],
                           anchor: torch.device) -> torch.Tensor:
        """``sum_i rescale_i**2 ||grad_i||**2 / loss_scale**2`` (the squared global gradient norm) from
        reduced per-tensor sums of squares."""
        total = torch.zeros((), dtype=torch.float64, device=anchor)
        for w, sq in zip(works, sumsqs):
            total = total + sq.sum().to(anchor) * float(w.group["rescale_grad"]) ** 2
        if inv_scale is not None:
            total = total * inv_scale.to(anchor) ** 2
        return total

    def _skip(self, works: List[_Work], bad: torch.Tensor, grad_norm: torch.Tensor, skip: torch.Tensor) -> bool:
        """Whether the step is skipped, decided on the host (the one host synchronisation of a step),
        or, when every work is capturable, counted on the device (returns False: the kernels skip)."""
        if all(w.capturable for w in works):
            self._count_on_device(skip, grad_norm)
            return False
        if bool(skip):
            self._skipped += 1
            return True
        self.last_grad_norm = grad_norm
        return False

    def _count_on_device(self, skip: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """``skipped_steps`` and ``last_grad_norm`` updated in place on the device (a captured graph
        replays the update on the same tensors)."""
        if self._skipped_on_device is None or self._skipped_on_device.device != skip.device:
            self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=skip.device)
        self._skipped_on_device.add_(skip.to(torch.int64))
        last = self.last_grad_norm
        if last is None or last.device != grad_norm.device or last.dtype != grad_norm.dtype:
            self.last_grad_norm = last = torch.zeros_like(grad_norm)
        last.copy_(torch.where(skip, last, grad_norm))

    @staticmethod
    def _skip_flag(bad: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The device's skip decision: a non-finite gradient anywhere (0-d bool)."""
        return (bad > 0) | ~torch.isfinite(grad_norm)

    def _step_plain(self, works: List[_Work], inv_scale: Optional[torch.Tensor], bad: torch.Tensor,
                    anchor: torch.device) -> None:
        """Gradient norms (global clipping norm, finite check), then phase 1, norms, phase 2.

        Phase 1 is prepared (lazy state, scalar rows, the backends' address tables) *before* the
        skip decision, the one host synchronisation of the step, and only launched after it: on
        a GPU the host's per-tensor work then overlaps the gradient pass instead of leaving the
        device idle.  A skipped step discards the preparation and the state it created.
        """
        for w in works:
            w.grad_sumsq = w.backend.grad_sum_of_squares(w.grads, memo=w.memo)
        sumsqs = self._reduce(works, [w.grad_sumsq for w in works])
        total = self._global_grad_sumsq(works, sumsqs, inv_scale, anchor)
        if self.partition_group is not None:  # ZeRO-1: every process holds other parameters
            pg = None if self.partition_group == "world" else self.partition_group  # None: the default group
            both = all_reduce_sum(torch.stack([total, bad]), pg)
            total, bad = both[0], both[1]
        grad_norm = torch.sqrt(total)
        skip = self._skip_flag(bad, grad_norm)
        batches = [self._batch(w, grad_norm, inv_scale, skip) for w in works]
        launches = [plan_phase1(w.backend, b) for w, b in zip(works, batches)]
        if self._skip(works, bad, grad_norm, skip):
            self._drop_fresh_state(works)
            return
        firsts = [launch() for launch in launches]
        self._finish(works, batches, firsts, self._reduce(works, [p1.sumsq for p1 in firsts]))

    def _drop_fresh_state(self, works: List[_Work]) -> None:
        """A skipped step wrote nothing: the state its batches created lazily goes too."""
        for w in works:
            for p in w.fresh or ():
                self.state.pop(p, None)
            w.fresh = []

    def _step_dry(self, works: List[_Work], inv_scale: Optional[torch.Tensor], bad: torch.Tensor,
                  anchor: torch.device) -> None:
        """Dry phase 1 everywhere, one all-reduce per process group, then phase 2 or an agreed skip.

        With ``max_grad_norm``, phase 1 first assumes that clipping does not clip (factor 1); when
        the reduced gradient norm says it does, the groups that clip run their dry phase 1 again
        with the clip factor and their norms take a second all-reduce.  Capturable steps cannot ask
        the host: their groups with ``max_grad_norm`` always take the second pass.
        """
        skip = torch.zeros((), dtype=torch.bool, device=anchor)  # decided after the all-reduce, read in phase 2
        batches = [self._batch(w, None, inv_scale, skip) for w in works]
        firsts = [w.backend.phase1_batch(b, dry=True) for w, b in zip(works, batches)]
        reduced = self._reduce(works, [p1.sumsq for p1 in firsts])
        grad_norm = torch.sqrt(self._global_grad_sumsq(works, [r[2] for r in reduced], inv_scale, anchor))
        skip.copy_(self._skip_flag(bad, grad_norm))
        if self._skip(works, bad, grad_norm, skip):
            self._drop_fresh_state(works)
            return
        reduced = [r[:2] for r in reduced]
        limits = [w.group["max_grad_norm"] for w in works]
        if any(m is not None for m in limits):
            clipped = [i for i, m in enumerate(limits)  # host syncs (free on CPU): few groups
                       if m is not None and (works[i].capturable or bool(grad_norm > m))]
            if clipped:
                sub = [works[i] for i in clipped]
                for i in clipped:
                    batches[i] = self._batch(works[i], grad_norm, inv_scale, skip)
                    firsts[i] = works[i].backend.phase1_batch(batches[i], dry=True)
                for i, r in zip(clipped, self._reduce(sub, [firsts[i].sumsq[:2] for i in clipped])):
                    reduced[i] = r
        self._finish(works, batches, firsts, reduced)

    def _finish(self, works: List[_Work], batches: List[LambBatch], firsts: list, reduced: List[torch.Tensor]) -> None:
        """Step sizes from the reduced norms, phase 2, step counts and telemetry."""
        self._last = []
        for w, batch, p1, sumsq in zip(works, batches, firsts, reduced):
            sumsq, steps, ratios = finish_norms(batch, sumsq, local_reducer)
            w.backend.phase2_batch(batch, p1, steps)  # (capturable: it advances the device step counts)
            if not w.capturable:
                w.counts.add_(1.0)  # every state["step"] of the work: views of this one tensor
            self._last.append((w.params, StepResult(sumsq=sumsq, step_sizes=steps, trust_ratios=ratios)))

    def _batch(self, work: _Work, grad_norm: Optional[torch.Tensor], inv_scale: Optional[torch.Tensor],
               skip: torch.Tensor) -> LambBatch:
        group = work.group
        device = work.params[0].device
        beta1, beta2 = group["betas"]
        clip = group["clip_gradient"]
        states = work.states = [self.state[p] for p in work.params]
        work.fresh = [p for p, st in zip(work.params, states) if not st]
        for p in work.fresh:  # lazy state, created on a parameter's first applied step
            init_state(p, self.state[p], work.fmt, work.master, work.kahan,
                       p.device if work.capturable else torch.device("cpu"))
        work.counts = _step_counts_as(states, work.capturable, device, work.memo)
        # capturable: the counts stay on the device, and with them the bias corrections (bias_table)
        steps = [1] * len(states) if work.capturable else [int(t) + 1 for t in work.counts.tolist()]
        cdtype = torch.float32 if work.master or work.kahan else compute_dtype(work.params[0].dtype)
        # maximize: the gradient negated, exactly (IEEE negation commutes with the scaling and the clip)
        rescale_grad = -float(group["rescale_grad"]) if group["maximize"] else float(group["rescale_grad"])
        table: Dict[int, Phase1Scalars] = {
            t: phase1_scalars(t=t, wd=group["weight_decay"], beta1=beta1, beta2=beta2, epsilon=group["eps"],
                              bias_correction=group["bias_correction"], rescale_grad=rescale_grad,
                              clip_gradient=-1.0 if clip is None else clip, dtype=cdtype,
                              grad_averaging=group["grad_averaging"])
            for t in set(steps)}
        scalars = [table[t] for t in steps]
        means = [st["exp_avg"] for st in states]
        vars_ = [st["exp_avg_sq"] for st in states]
        masters = [st["master_weight"] for st in states] if work.master else [None] * len(states)
        blocked = work.fmt not in ("fp32", "bf16")
        mean_scales = [st["exp_avg_scale"] for st in states] if blocked else None
        var_scales = [st["exp_avg_sq_scale"] for st in states] if blocked else None
        comps = [st["kahan_comp"] for st in states] if work.kahan else None
        offsets = None
        if work.dtensor and blocked:  # the dither indexes the whole parameter: each shard's first element's index
            held = work.memo.get("dither_offsets")
            if held is None or len(held[0]) != len(work.params) or not all(map(operator.is_, held[0], work.params)):
                held = work.memo["dither_offsets"] = (list(work.params), [dither_offset(p) for p in work.params])
            offsets = held[1]
        weights, grads = list(work.params), work.grads  # the very list the gradient pass saw
        if work.dtensor:  # the kernels see local shards
            means, vars_, weights = ([local(t) for t in ts] for ts in (means, vars_, weights))
            masters = [local(t) for t in masters] if work.master else masters
            mean_scales, var_scales, comps = (None if ts is None else [local(t) for t in ts]
                                              for ts in (mean_scales, var_scales, comps))
        rescale = None
        max_norm = group["max_grad_norm"]
        if inv_scale is not None or (max_norm is not None and grad_norm is not None):
            factor = torch.full((), rescale_grad, dtype=torch.float64, device=device)
            if inv_scale is not None:
                factor = factor * inv_scale.to(device)
            if max_norm is not None and grad_norm is not None:  # None: not clipping (yet)
                gn = grad_norm.to(device)
                factor = factor * torch.where(gn > max_norm, max_norm / gn, torch.ones_like(gn))
            rescale = factor.to(cdtype)
        lr = group["lr"]
        on_device = None
        if work.capturable:
            on_device = DeviceScalars(
                steps=[st["step"] for st in states], skip=skip.to(device),
                bias=self._bias_on_device(work, cdtype),
                lr=(lr.to(device, torch.float64, non_blocking=True) if isinstance(lr, torch.Tensor)
                    else torch.full((), float(lr), dtype=torch.float64, device=device)).reshape(()))
            lr = 0.0  # (read from on_device.lr)
        else:
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        return LambBatch(
            weights=weights, grads=grads, means=means, vars=vars_,
            masters=masters, outs=weights, scalars=scalars, lrs=[lr] * len(work.params),
            adapt=None if group["layer_adaptation"] else [False] * len(work.params),
            lower_bound=group["lower_bound"], upper_bound=group["upper_bound"],
            max_trust_ratio=group["max_trust_ratio"], rescale=rescale, uniform=True, memo=work.memo,
            on_device=on_device, moment_format=work.fmt, mean_scales=mean_scales, var_scales=var_scales,
            comps=comps, counts=steps, offsets=offsets,
        )

    @staticmethod
    def _bias_on_device(work: _Work, cdtype: torch.dtype) -> torch.Tensor:
        """The group's bias-correction table (:func:`mplamb._scalars.bias_table`) on the work's device,
        uploaded once per (betas, bias_correction, dtype) and kept in the work's memo."""
        g = work.group
        key = (tuple(g["betas"]), g["bias_correction"], cdtype)
        held = work.memo.get("bias_table")
        if held is None or held[0] != key:
            table = bias_table(float(g["betas"][0]), float(g["betas"][1]), g["bias_correction"], cdtype)
            held = work.memo["bias_table"] = (key, table.to(work.params[0].device))
        return held[1]

    # ------------------------------------------------------------------ telemetry

    def last_step_stats(self) -> Dict[str, Any]:
        """Per-parameter statistics of the last applied step, as device tensors (no host sync).

        Returns ``params`` (the parameters that stepped, in param-group order) and ``(n,)``
        float64 tensors ``trust_ratio`` (:math:`\\eta/\\gamma`), ``step_size`` (:math:`\\eta`),
        ``weight_norm`` (:math:`r_1` before the step, unbounded) and ``update_norm``
        (:math:`r_2 = \\lVert u \\rVert`), on the device of the first parameter.
        DeepSpeed's ``get_lamb_coeffs`` without one synchronisation per parameter.
        """
        if not self._last:
            return {"params": [], "trust_ratio": torch.zeros(0, dtype=torch.float64),
                    "step_size": torch.zeros(0, dtype=torch.float64),
                    "weight_norm": torch.zeros(0, dtype=torch.float64),
                    "update_norm": torch.zeros(0, dtype=torch.float64)}
        device = self._last[0][1].sumsq.device
        order = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        entries = []
        for params, res in self._last:
            for j, p in enumerate(params):
                entries.append((order[id(p)], p, res, j))
        entries.sort(key=lambda e: e[0])

        def gather(fn):
            parts = [fn(res)[j:j + 1].to(device, non_blocking=True) for _, _, res, j in entries]
            return torch.cat(parts)

        return {
            "params": [e[1] for e in entries],
            "trust_ratio": gather(lambda r: r.trust_ratios),
            "step_size": gather(lambda r: r.step_sizes),
            "weight_norm": gather(lambda r: r.weight_norms),
            "update_norm": gather(lambda r: r.update_norms),
        }

    def state_memory(self) -> Dict[str, float]:
        """Bytes of the optimizer state (moments or codes and scales, masters, compensations; not step
        counts) measured from the tensors: ``{"state_bytes", "params", "bytes_per_param"}``."""
        return state_memory(self)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim`` state dict plus ``"mplamb": {"skipped_steps": n}``; masters included."""
        sd = super().state_dict()
        for key, st in list(sd["state"].items()):  # a count of its own, not a view of the work's counts
            step = st.get("step")
            if isinstance(step, torch.Tensor) and step._base is not None:
                sd["state"][key] = {**st, "step": step.clone()}
        skipped = int(self.skipped_steps)  # (waits for the device where skips were counted there)
        sd["mplamb"] = {"skipped_steps": skipped}
        if sd["param_groups"]:  # where torch.distributed.checkpoint carries it (only state and param_groups)
            sd["param_groups"][0]["skipped_steps"] = skipped
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, keeping every state tensor's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the
        parameter's dtype, which would round the fp32 masters and moments of a bf16 model
        to bf16; here they are restored exactly (moved to the parameter's device only).
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' (from Lamb.state_dict())")
        self._memo.clear()  # the state tensors are about to be replaced
        state_dict = dict(state_dict)
        extra = state_dict.pop("mplamb", {}) or {}
        groups_in = state_dict["param_groups"]
        skipped = extra.get("skipped_steps", groups_in[0].get("skipped_steps", 0) if groups_in else 0)
        saved_groups = state_dict["param_groups"] = [  # (set below through the skipped_steps property)
            {k: v for k, v in g.items() if k != "skipped_steps"} for g in groups_in]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for i, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict: param group {i} has {len(sg['params'])} parameters, this "
                                 f"optimizer's has {len(g['params'])}")
            check_group({**self.defaults, **{k: v for k, v in sg.items() if k != "params"}})
        ids = [pid for sg in saved_groups for pid in sg["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            st = state_dict["state"].get(pid)
            if st is not None:
                self._check_saved_state(st, p)
        storage = [(g["moments"], g["master_weights"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, (moments, master_weights) in zip(self.param_groups, storage):  # this optimizer's storage choice
            g["moments"], g["master_weights"] = moments, master_weights
        owner = {p: g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(ids, params):
            st = state_dict["state"].get(pid)
            if st is None:
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    self.state[p][k] = v.detach().to(device=p.device, copy=True)
                elif k == "step":  # (the form a step needs is made at that step: _step_counts_as)
                    self.state[p][k] = v.detach().clone() if isinstance(v, torch.Tensor) else int(v)
            convert(self.state[p], p, *param_storage(owner[p], p))
        self.skipped_steps = int(skipped)

    @staticmethod
    def _check_saved_state(st: Dict[str, Any], p: torch.Tensor) -> None:
        """A saved state's tensors have the shapes a parameter of ``p``'s shape needs (raises)."""
        scaled = "exp_avg_scale" in st
        fmt = ("8bit" if getattr(st.get("exp_avg"), "dtype", None) == torch.int8 else "4bit") if scaled else None
        for k in ("exp_avg", "exp_avg_sq", "master_weight", "kahan_comp", "exp_avg_scale", "exp_avg_sq_scale"):
            v = st.get(k)
            if v is None:
                continue
            want = tuple(p.shape)
            if fmt is not None and k in ("exp_avg", "exp_avg_sq"):
                want = codec.code_shape(fmt, p.shape)
            elif k.endswith("_scale"):
                want = codec.scale_shape(fmt, p.shape) if fmt else None
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
                raise ValueError(f"state_dict: state {k!r} of a parameter of shape {tuple(p.shape)} has "
                                 f"shape {tuple(getattr(v, 'shape', ()))}")
