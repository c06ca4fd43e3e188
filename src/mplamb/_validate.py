"""Argument checks shared by the operators and the optimizer.

Every check raises before anything is mutated, and every message names the
argument and says what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "check_tensor",
    "check_like",
    "check_step",
    "check_real",
    "check_beta",
    "check_no_overlap",
    "check_list_length",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """``x`` is a dense tensor of one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: sparse or non-strided tensors are not supported (layout {x.layout})")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(x.dtype).replace('torch.', '')}")
    return x


def check_like(name: str, x: object, ref: torch.Tensor, ref_name: str, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """``x`` is a tensor of ``dtypes`` with ``ref``'s shape and device."""
    check_tensor(name, x, dtypes)
    assert isinstance(x, torch.Tensor)
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")
    return x


def check_step(name: str, t: object) -> int:
    """``t`` is an integer step count >= 1 (mplamb D5: MXNet accepts 0 and negatives)."""
    if isinstance(t, bool):
        raise TypeError(f"{name}: expected an int >= 1, got bool")
    try:
        value = operator.index(t)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}: expected an int >= 1, got {type(t).__name__}") from None
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1 (steps count from 1), got {value}")
    return value


def check_real(
    name: str,
    x: object,
    *,
    minimum: Optional[float] = None,
    finite: bool = True,
    allow_none: bool = False,
    allow_nan: bool = False,
) -> Optional[float]:
    """``x`` is a real number (not NaN unless ``allow_nan``; finite unless ``finite=False``; ``>= minimum``)."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
            x = x.item()
        else:
            raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    value = float(x)
    if math.isnan(value) and allow_nan:
        return value
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {value}")
    return value


def check_beta(name: str, beta: object) -> float:
    """``0 <= beta < 1``."""
    value = check_real(name, beta)
    assert value is not None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value}")
    return value


def check_list_length(name: str, values: object, n: int, what: str = "weights") -> list:
    """``values`` is a sequence of length ``n`` (the number of tensors)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        else:
            raise TypeError(f"{name}: expected a sequence with one entry per tensor, got {type(values).__name__}")
    values = list(values)  # type: ignore[arg-type]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} entries (one per tensor of {what}), got {len(values)}")
    return values


def _extent(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    if t.numel() == 0:
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    ea, eb = _extent(a), _extent(b)
    if ea is None or eb is None:
        return False
    return ea[0] < eb[1] and eb[0] < ea[1]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def check_no_overlap(
    mutated: Dict[str, torch.Tensor],
    read: Dict[str, torch.Tensor],
    allowed_alias: Sequence[Tuple[str, str]] = (),
) -> None:
    """No tensor written in place shares memory with any other argument.

    ``allowed_alias`` lists ``(written, read)`` pairs that may be the *same* view
    (``out=weight`` is an in-place update); a partial overlap is always an error.
    Skipped while tracing under ``torch.compile`` (fake tensors have no memory).
    """
    if torch.compiler.is_compiling():
        return
    for name, t in mutated.items():
        if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{name}: has internally overlapping memory (e.g. an expanded tensor); it cannot be updated in place")
    names = list(mutated.items()) + list(read.items())
    for i, (na, a) in enumerate(mutated.items()):
        for nb, b in names[i + 1 :]:
            if not _overlap(a, b):
                continue
            if ((na, nb) in allowed_alias or (nb, na) in allowed_alias) and _same_view(a, b):
                continue
            raise ValueError(f"{na}: shares memory with {nb}; tensors updated in place must not overlap other arguments")
