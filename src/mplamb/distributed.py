"""Which processes a parameter's partial norms are summed over, and the sums themselves.

LAMB needs the norm of every *whole* parameter.  Where a parameter is sharded across
processes — a ``DTensor`` from FSDP2's ``fully_shard``, or plain tensors sharded by the
user (``Lamb(process_group=...)``) — each process holds partial sums of squares, and
the whole norm is their sum over the processes that hold the shards:

* DTensor: the process group of its mesh dimension with a ``Shard`` placement; replicated
  mesh dimensions are not summed (they hold copies, not parts);
* plain tensors: ``process_group`` when given, else nothing is reduced (one process, DDP,
  ZeRO-1: each process holds whole parameters).

The optimizer sums all partial norms of one group — weights', updates' and gradients' — in
**one** all-reduce per step (two on a step where ``max_grad_norm`` clips; see :meth:`mplamb.Lamb.step`).  Elementwise work only ever touches local shards.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["DTensor", "is_dtensor", "local", "shard_group", "all_reduce_sum", "AVAILABLE"]

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None
    DTensor = ()  # type: ignore[assignment]
    AVAILABLE = False


def is_dtensor(t: Any) -> bool:
    return AVAILABLE and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The process-local part of ``t`` (its local shard for a DTensor; ``t`` itself otherwise).

    A view: in-place updates of it are updates of ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(p: torch.Tensor, process_group: Optional[Any] = None) -> Optional[Any]:
    """The process group over which ``p``'s partial norms are summed (``None``: they are whole)."""
    if not is_dtensor(p):
        return process_group
    placements = p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError("Lamb: a parameter with a Partial placement has no well-defined local values; "
                         "redistribute it to Shard or Replicate first")
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("Lamb: parameters sharded over more than one mesh dimension are not supported "
                                  f"(placements {placements}); shard over one dimension (FSDP2 / HSDP do)")
    return p.device_mesh.get_group(dims[0])


def all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (one collective) and return it."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
