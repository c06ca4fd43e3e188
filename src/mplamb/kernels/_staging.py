"""Explicit contiguous stand-ins for kernels that need contiguous memory.

Read-only tensors are copied; tensors a step writes are copied and copied *back* by
:meth:`Staging.finish` — never a silent ``.contiguous()`` copy that an in-place update
would land on and lose.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

__all__ = ["Staging"]


class Staging:
    """Contiguous stand-ins for non-contiguous tensors, copied back on :meth:`finish`."""

    def __init__(self) -> None:
        self._back: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._by_id: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """How many stand-ins were made."""
        return len(self._by_id)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return t
        if id(t) not in self._by_id:
            self._by_id[id(t)] = t.contiguous()
        return self._by_id[id(t)]

    def write(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return t
        if id(t) not in self._by_id:
            tmp = t.contiguous()
            self._by_id[id(t)] = tmp
            self._back.append((t, tmp))
        return self._by_id[id(t)]

    def finish(self) -> None:
        for t, tmp in self._back:
            t.copy_(tmp)
