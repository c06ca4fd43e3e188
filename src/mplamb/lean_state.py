"""Where ``mplamb.Lamb`` keeps its per-parameter state, and in which storage format.

The one place the optimizer decides, per parameter, how its state is stored (the formats
themselves, and their arithmetic, are :mod:`mplamb.kernels.codec`):

* ``moments`` (a param-group option): ``"fp32"`` (default), ``"bf16"``, ``"8bit"`` or ``"4bit"``.
  The blocked formats apply to tensors of at least ``codec.MIN_QUANTIZED_NUMEL`` elements; smaller
  ones keep float32 moments, float64 parameters keep float64 ones (:func:`param_storage`).
* ``master_weights`` (a param-group option): ``None``/``True`` (a float32 master for every float16/
  bfloat16 parameter), ``False`` (none) or ``"kahan"`` (a compensation of the parameter's own dtype
  instead of a master: 2 bytes instead of 4 per parameter).

State keys (``opt.state[p]``): ``step``; ``exp_avg``/``exp_avg_sq`` (the moments, or their codes);
``exp_avg_scale``/``exp_avg_sq_scale`` (float32 block scales, blocked formats only);
``master_weight`` (float32) or ``kahan_comp`` (the parameter's dtype).  The format a state holds is
read from its tensors (:func:`stored_format`), so a checkpoint needs no extra field, and
:func:`convert` turns a loaded state into the format the loading optimizer's groups ask for.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._validate import HALF_DTYPES
from .distributed import is_dtensor, local
from .kernels import codec

__all__ = ["MOMENT_FORMATS", "check_storage", "param_storage", "init_state", "dither_offset", "stored_format",
           "convert", "state_memory"]

MOMENT_FORMATS = codec.FORMATS


def check_storage(group: Dict[str, Any]) -> None:
    """Validate a group's ``moments`` and ``master_weights`` (raises, naming the argument)."""
    moments = group.get("moments", "fp32")
    if not isinstance(moments, str) or moments not in MOMENT_FORMATS:
        raise ValueError(f"moments: expected one of {list(MOMENT_FORMATS)}, got {moments!r}")
    mw = group.get("master_weights")
    if not (mw is None or isinstance(mw, bool) or mw == "kahan"):
        raise TypeError(f"master_weights: expected None, a bool or 'kahan', got {mw!r}")


def _shard_rows_only(p: torch.Tensor) -> bool:
    """A DTensor whose local part is whole rows: sharded on dim 0 only (FSDP2), or replicated."""
    return all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in p.placements)


def param_storage(group: Dict[str, Any], p: torch.Tensor) -> Tuple[str, bool, bool]:
    """``(moment format, master, kahan)`` of parameter ``p`` in ``group``.

    The blocked formats cut rows into blocks; a DTensor gets them only when its local part is whole
    rows of the parameter (sharded on dim 0, as FSDP2 shards), so blocks never straddle processes.
    """
    dtensor = is_dtensor(p)
    mode = group.get("moments", "fp32")
    if dtensor and mode in codec.BLOCKED and not _shard_rows_only(p):
        mode = "bf16"
    fmt = codec.storage_format(mode, p.shape, p.dtype, sharded=dtensor and p.dim() < 2)
    half = p.dtype in HALF_DTYPES
    mw = group.get("master_weights")
    kahan = half and mw == "kahan"
    master = half and mw is not False and mw != "kahan"
    return fmt, master, kahan


def _like(p: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of the *global* ``shape`` laid out like ``p``: a DTensor on ``p``'s mesh and placements
    (its local part: ``p``'s local rows) for a DTensor ``p``, else a plain contiguous tensor."""
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import DTensor

    loc = local(p)
    # sharded on dim 0 (rows) or replicated: the local part holds the local rows (1-d: replicated, all)
    local_shape = (loc.shape[0],) + tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.insert(0, acc)
        acc *= int(d)
    return DTensor.from_local(torch.zeros(local_shape, dtype=dtype, device=loc.device), p.device_mesh, p.placements,
                              run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def init_state(p: torch.Tensor, state: Dict[str, Any], fmt: str, master: bool, kahan: bool,
               step_device: torch.device) -> None:
    """The fresh state of ``p``: step 0, zero moments in ``fmt``, a master or a compensation."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
    if fmt == "fp32":
        moment_dtype = torch.float32 if p.dtype in HALF_DTYPES else p.dtype
        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
    elif fmt == "bf16":
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
    else:
        codes = codec.code_shape(fmt, p.shape)
        scales = codec.scale_shape(fmt, p.shape)
        state["exp_avg"] = _like(p, codes, codec.code_dtype(fmt, "mean"))
        state["exp_avg_sq"] = _like(p, codes, codec.code_dtype(fmt, "var"))
        state["exp_avg_scale"] = _like(p, scales, torch.float32)
        state["exp_avg_sq_scale"] = _like(p, scales, torch.float32)
    if master:
        state["master_weight"] = p.detach().to(torch.float32, copy=True)
    if kahan:
        state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.contiguous_format)


def dither_offset(p: torch.Tensor) -> int:
    """The row-major index, in the whole parameter, of the first element of ``p``'s local part: 0 for a plain
    or replicated tensor, the first local row times the row length for a DTensor sharded on dim 0.  The
    second moment's dither draws by this global index (:func:`codec.dither`), so a sharded parameter is
    rounded as the whole one would be, whatever the number of processes (and a resharded resume too)."""
    if not is_dtensor(p) or p.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    index, stride = 0, 1
    for d in reversed(range(p.dim())):  # (the contiguous strides of the global shape)
        index += int(offset[d]) * stride
        stride *= int(p.shape[d])
    return index


def stored_format(state: Dict[str, Any], p: torch.Tensor) -> str:
    """The moment format ``state`` holds (read from its tensors' dtypes)."""
    mean = state.get("exp_avg")
    if mean is None:
        return "fp32"
    if "exp_avg_scale" in state:
        return "8bit" if mean.dtype == torch.int8 else "4bit"
    return "bf16" if mean.dtype == torch.bfloat16 else "fp32"


def _decoded(state: Dict[str, Any], p: torch.Tensor, fmt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = p.shape
    m = codec.decode_mean(state["exp_avg"], state.get("exp_avg_scale"), fmt, shape)
    v = codec.decode_var(state["exp_avg_sq"], state.get("exp_avg_sq_scale"), fmt, shape)
    return m, v


def convert(state: Dict[str, Any], p: torch.Tensor, fmt: str, master: bool, kahan: bool) -> None:
    """Turn a loaded ``state`` of ``p`` into the storage ``(fmt, master, kahan)`` in place.

    Moments are decoded and re-encoded (the second moment dithered by the state's step count; a
    conversion to the format held is no change at all).  A master weight becomes a compensation
    ``c = RN(master - float32(p))`` and back ``master = float32(p) + float32(c)``; one that the new
    storage has no place for is dropped.  DTensor states convert only within their format.
    """
    held = stored_format(state, p)
    if "exp_avg" in state and held != fmt:
        if is_dtensor(state["exp_avg"]) or is_dtensor(p):
            raise ValueError(f"load_state_dict: the checkpoint holds {held!r} moments and this optimizer keeps "
                             f"{fmt!r}; sharded (DTensor) states load only into the same format (set moments="
                             f"{held!r}, or convert the checkpoint unsharded)")
        m, v = _decoded(state, p, held)
        if fmt == "fp32":
            dtype = torch.float32 if p.dtype in HALF_DTYPES else p.dtype
            state["exp_avg"], state["exp_avg_sq"] = m.to(dtype), v.to(dtype)
            state.pop("exp_avg_scale", None)
            state.pop("exp_avg_sq_scale", None)
        else:
            seed = int(state["step"]) if isinstance(state.get("step"), (int, float, torch.Tensor)) else 0
            state["exp_avg"], ms = codec.encode_mean(m.to(torch.float32), fmt)
            state["exp_avg_sq"], vs = codec.encode_var(v.to(torch.float32).clamp_min(0.0), fmt, seed)
            if ms is None:
                state.pop("exp_avg_scale", None)
                state.pop("exp_avg_sq_scale", None)
            else:
                state["exp_avg_scale"], state["exp_avg_sq_scale"] = ms, vs
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            if k in state:
                state[k] = state[k].to(p.device)
    mw, comp = state.get("master_weight"), state.get("kahan_comp")
    weight = local(p).detach()
    if kahan and comp is None:
        source = local(mw) if mw is not None else None
        comp_new = (torch.zeros_like(weight) if source is None
                    else codec.kahan_split(source.to(torch.float32), weight.dtype)[1])
        state["kahan_comp"] = comp_new if not is_dtensor(p) else _wrap_like(p, comp_new)
    if master and mw is None:
        eff = codec.effective_weight(weight, None if comp is None else local(comp))
        state["master_weight"] = eff if not is_dtensor(p) else _wrap_like(p, eff)
    if not master:
        state.pop("master_weight", None)
    if not kahan:
        state.pop("kahan_comp", None)


def _wrap_like(p: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def state_memory(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Bytes of ``optimizer``'s state tensors (moments, codes, scales, masters, compensations; not the
    step counts), counted from the tensors themselves (local shards for DTensors), per parameter.

    Returns ``{"state_bytes", "params", "bytes_per_param"}`` over the parameters that have state.
    """
    total, params = 0, 0
    for p, st in optimizer.state.items():
        if not st:
            continue
        params += local(p).numel()
        for k, v in st.items():
            if k != "step" and isinstance(v, torch.Tensor):
                t = local(v)
                total += t.numel() * t.element_size()
    return {"state_bytes": float(total), "params": float(params),
            "bytes_per_param": total / params if params else 0.0}
