"""Launch planning shared by the fused backends (numba on CPU, Triton on GPU).

Both hand the kernels every tensor of a batch at once, as raw addresses plus small tables:

* :func:`partition`: the tensors that share dtypes (one launch each);
* :func:`chunk_table`: fixed-size chunks covering every tensor (one parallel work item or
  GPU program each), with each tensor's first chunk so per-chunk partial sums can be
  reduced per tensor in a fixed order; :func:`block_table`: the same in runs of whole codec
  blocks (the lean step's blocked formats);
* :func:`addresses` / :func:`owned_addresses`: data addresses, non-contiguous tensors
  staged through :class:`~._staging.Staging`; the optimizer-owned ones remembered between
  steps in the batch memo; :func:`gradient_addresses` / :func:`noted_gradient_addresses`: the
  gradient pass's addresses, handed to phase 1 of the same step;
* :func:`scalar_tables`: the per-tensor hyper-parameter rows the kernels read.
"""
from __future__ import annotations

import functools
import operator
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ._staging import Staging
from .contract import LambBatch

__all__ = ["Chunks", "partition", "chunk_table", "block_table",
           "addresses", "owned_addresses", "batch_addresses", "scalar_tables",
           "sizes_of", "by_dtype", "gradient_addresses", "noted_gradient_addresses"]

_NOTED = "grad_addresses"  # the memo key under which the gradient pass leaves addresses for phase 1


class Chunks(NamedTuple):
    """Chunk ``k`` covers elements ``[start[k], start[k] + length[k])`` of tensor ``tensor[k]``;
    tensor ``i``'s chunks are ``first[i]`` to ``first[i + 1] - 1`` (empty tensors have none)."""

    tensor: np.ndarray  # int64 (K,)
    start: np.ndarray  # int64 (K,)
    length: np.ndarray  # int64 (K,)
    first: np.ndarray  # int64 (n + 1,)


def sizes_of(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.fromiter(map(torch.Tensor.numel, tensors), dtype=np.int64, count=len(tensors))


def by_dtype(tensors: Sequence[torch.Tensor]) -> Dict[torch.dtype, List[int]]:
    """Indices of the tensors of each dtype (one launch each; the usual single dtype without a Python loop)."""
    dtypes = set(map(operator.attrgetter("dtype"), tensors))
    if len(dtypes) == 1:
        return {dtypes.pop(): list(range(len(tensors)))}
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def chunk_table(sizes: np.ndarray, chunk: int) -> Chunks:
    """:class:`Chunks` of ``chunk`` elements over tensors of the int64 ``sizes`` (cached)."""
    return _chunks(sizes.tobytes(), chunk)


@functools.lru_cache(maxsize=64)
def _chunks(key: bytes, chunk: int) -> Chunks:
    sz = np.frombuffer(key, dtype=np.int64)
    counts = (sz + chunk - 1) // chunk
    first = np.zeros(len(sz) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    tensor = np.repeat(np.arange(len(sz), dtype=np.int64), counts)
    start = (np.arange(tensor.shape[0], dtype=np.int64) - first[tensor]) * chunk
    length = np.minimum(chunk, sz[tensor] - start) if tensor.shape[0] else np.zeros(0, np.int64)
    return Chunks(tensor, start, length, first)


def block_table(shapes: Sequence[Tuple[int, int]], block: int, chunk: int) -> Chunks:
    """:class:`Chunks` of whole blocks (:mod:`.codec`: rows of ``L`` elements cut into blocks of ``block``,
    the last of a row possibly shorter) over tensors of ``(rows, L)`` ``shapes``: each work item is a
    run of at most ``chunk // min(block, L)`` consecutive blocks (at most ``chunk`` elements), which may
    span rows; since rows are consecutive in memory, it is one element range (cached)."""
    return _blocks(np.asarray(shapes, dtype=np.int64).reshape(-1, 2).tobytes(), block, chunk)


@functools.lru_cache(maxsize=64)
def _blocks(key: bytes, block: int, chunk: int) -> Chunks:
    shapes = np.frombuffer(key, dtype=np.int64).reshape(-1, 2)
    tensor, start, length, first = [], [], [], [0]
    for i, (rows, width) in enumerate(shapes.tolist()):
        nb = -(-width // block)
        total = rows * nb
        per = max(1, chunk // max(1, min(block, width)))
        kb = np.arange(0, total, per, dtype=np.int64)  # each item's first block
        kl = np.minimum(kb + per, total) - 1  # and last
        s = (kb // nb) * width + (kb % nb) * block
        e = (kl // nb) * width + np.minimum((kl % nb + 1) * block, width)
        tensor.append(np.full(kb.shape[0], i, dtype=np.int64))
        start.append(s)
        length.append(e - s)
        first.append(first[-1] + kb.shape[0])
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return Chunks(cat(tensor), cat(start), cat(length), np.asarray(first, dtype=np.int64))


def partition(batch: LambBatch) -> Dict[tuple, List[int]]:
    """Indices of the tensors that share (decay-source, grad, moment, output) dtypes and master-ness."""
    if batch.uniform:
        m0 = batch.masters[0]
        key = ((batch.weights[0] if m0 is None else m0).dtype, batch.grads[0].dtype, batch.means[0].dtype,
               m0 is not None, batch.outs[0].dtype)
        return {key: list(range(len(batch.weights)))}
    parts: Dict[tuple, List[int]] = {}
    for i, (w, g, m, master, o) in enumerate(zip(batch.weights, batch.grads, batch.means, batch.masters, batch.outs)):
        key = ((w if master is None else master).dtype, g.dtype, m.dtype, master is not None, o.dtype)
        part = parts.get(key)
        if part is None:
            part = parts[key] = []
        part.append(i)
    return parts


def addresses(tensors: Sequence[torch.Tensor], stage: Staging, written: Sequence[bool] = ()) -> np.ndarray:
    """Data addresses (int64), non-contiguous tensors staged first (``written[k]``, default True: tensor
    ``k`` is written by the step, so its stand-in is copied back)."""
    if all(map(torch.Tensor.is_contiguous, tensors)):  # the usual case, without a Python loop
        return np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))
    ptrs = []
    for k, t in enumerate(tensors):
        if not t.is_contiguous():
            t = stage.write(t) if (written[k] if written else True) else stage.read(t)
        ptrs.append(t.data_ptr())
    return np.array(ptrs, dtype=np.int64)


def owned_addresses(name: tuple, tensors: List[torch.Tensor], stage: Staging,
                    memo: Optional[dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Addresses and sizes of tensors the caller owns and never re-points (moments, masters),
    remembered in ``memo`` from one step to the next while the list holds the very same (contiguous)
    tensor objects."""
    if memo is not None:
        hit = memo.get(name)
        if hit is not None and len(hit[0]) == len(tensors) and all(map(operator.is_, hit[0], tensors)):
            return hit[1], hit[2]
    staged = len(stage)
    addr = addresses(tensors, stage)
    sizes = sizes_of(tensors)
    if memo is not None and len(stage) == staged:  # staged stand-ins are per step: not remembered
        memo[name] = (list(tensors), addr, sizes)
    return addr, sizes


def gradient_addresses(grads: Sequence[torch.Tensor], group: Sequence[torch.Tensor], stage: Staging,
                       memo: Optional[dict]) -> np.ndarray:
    """Addresses of ``group``, the gradients of one dtype among ``grads``.  When that is all of them and
    none was staged, they are left in ``memo`` for phase 1 of the same step, which takes them only for
    this very list object (:func:`noted_gradient_addresses`, :func:`batch_addresses`)."""
    addr = addresses(group, stage, [False] * len(group))
    if memo is not None and len(group) == len(grads) and not len(stage):
        memo[_NOTED] = (grads, addr)
    return addr


def noted_gradient_addresses(batch: LambBatch) -> Optional[tuple]:
    """What the gradient pass left in ``batch.memo`` (this step's, or a stale one), removed from it."""
    return batch.memo.pop(_NOTED, None) if batch.memo is not None else None


def batch_addresses(batch: LambBatch, part: tuple, idx: List[int], stage: Staging,
                    noted: Optional[tuple]) -> Tuple[np.ndarray, ...]:
    """``(w, grad, mean, var, out)`` addresses and the sizes of tensors ``idx`` of ``batch``, one
    partition (key ``part`` of :func:`partition`).  ``w`` is the decay source (the master, or the
    weight); ``out`` equals ``w`` where the weight is updated in place.  ``noted`` is what the
    gradient pass left in the memo (``(grads, addresses)``): used only for this very list."""
    everything = len(idx) == len(batch.weights)

    def pick(tensors: List) -> List:
        return tensors if everything else [tensors[i] for i in idx]

    has_master = part[3]
    m_addr, sz = owned_addresses(("mean",) + part, pick(batch.means), stage, batch.memo)
    v_addr, _ = owned_addresses(("var",) + part, pick(batch.vars), stage, batch.memo)
    if has_master:  # masters: the master is the decay source, read and written; the weights are outputs only
        w_addr, _ = owned_addresses(("master",) + part, pick(batch.masters), stage, batch.memo)
        o_addr = addresses(pick(batch.outs), stage)
    else:  # the weight is the decay source, written where it is its own output (in place)
        if batch.outs is batch.weights:  # the optimizer's batches: every weight updated in place
            inplace = [True] * len(idx)
        else:
            inplace = [batch.outs[i] is batch.weights[i] for i in idx]
        w_addr = addresses(pick(batch.weights), stage, inplace)
        o_addr = w_addr if all(inplace) else np.where(inplace, w_addr, addresses(pick(batch.outs), stage))
    if everything and noted is not None and noted[0] is batch.grads:  # from this step's gradient pass
        g_addr = noted[1]
    else:
        g_addr = addresses(pick(batch.grads), stage, [False] * len(idx))
    return w_addr, g_addr, m_addr, v_addr, o_addr, sz


def scalar_tables(batch: LambBatch, idx: List[int], dtype: np.dtype,
                  rescale: Optional[float], clip_off: float = -1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Per-tensor rows ``scal[k]`` = (rescale, clip, beta1, beta2, 1-beta1, 1-beta2, eps, wd) in
    ``dtype`` (clip = ``clip_off`` where clipping is off: -1 for the Triton kernels, which branch on
    it, +inf for the numba ones, which clip every element; ``rescale``, if given, replaces every
    tensor's) and ``bias[k]`` = (bias1, bias2, 1/bias1, 1/bias2) in float64 (all 0: no bias
    correction) for tensors ``idx``."""
    scalars = batch.scalars if len(idx) == len(batch.scalars) else [batch.scalars[i] for i in idx]
    if len(set(map(id, scalars))) == 1:  # the usual case: one step count for all (one row, repeated)
        scalars = scalars[:1]
    uniq: Dict[int, int] = {}
    rows_scal, rows_bias, which = [], [], []
    for sc in scalars:
        r = uniq.get(id(sc))
        if r is None:
            r = uniq[id(sc)] = len(rows_scal)
            rows_scal.append((sc.rescale if rescale is None else rescale, clip_off if sc.clip is None else sc.clip,
                              sc.beta1, sc.beta2, sc.one_minus_beta1, sc.one_minus_beta2, sc.epsilon, sc.wd))
            rows_bias.append((0.0, 0.0, 0.0, 0.0) if sc.bias1 is None else
                             (sc.bias1, sc.bias2, 1.0 / sc.bias1, 1.0 / sc.bias2))
        which.append(r)
    sel = np.asarray(which, dtype=np.int64) if len(which) == len(idx) else np.zeros(len(idx), dtype=np.int64)
    return np.asarray(rows_scal, dtype=dtype)[sel], np.asarray(rows_bias, dtype=np.float64)[sel]
