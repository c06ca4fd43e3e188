"""``param_groups(model)``: the usual split of a model's parameters for LAMB.

Biases and normalisation weights are excluded from weight decay (BERT, Apex and timm
all do this) and, optionally, from layer adaptation (TF-Addons'
``exclude_from_layer_adaptation``, LAMB paper's BERT setup).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, Iterable, List

import torch
from torch import nn

__all__ = ["param_groups", "NORM_LAYERS"]

NORM_LAYERS = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    *,
    no_decay: Iterable[str] = ("*bias", "*norm*", "*ln_*", "*embedding*pos*"),
    exclude_from_adaptation: bool = False,
    **group_options: Any,
) -> List[Dict[str, Any]]:
    """Two param groups for ``Lamb``: ``decay`` and ``no_decay`` (empty groups are dropped).

    A trainable parameter goes to ``no_decay`` when it is 0-d or 1-d (biases, norm scales),
    when its module is a normalisation layer (:data:`NORM_LAYERS`), when its qualified name
    matches one of the ``no_decay`` glob patterns (case-insensitive), or when the model says so in
    timm's convention: its name is in ``model.no_weight_decay()`` (a ViT's ``pos_embed`` and
    ``cls_token``) or contains one of ``model.no_weight_decay_keywords()`` (a Swin's
    ``relative_position_bias_table``).  The ``no_decay`` group
    gets ``weight_decay=0`` and, with ``exclude_from_adaptation=True``, ``layer_adaptation=False``.
    ``group_options`` are copied into both groups.

    >>> groups = param_groups(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), weight_decay=0.01)
    >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
    ([1, 3], [0.01, 0.0])
    """
    patterns = [p.lower() for p in no_decay]
    named = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    keywords = (set(model.no_weight_decay_keywords()) if callable(getattr(model, "no_weight_decay_keywords", None))
                else set())
    norm_params = set()
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay: List[torch.Tensor] = []
    skip: List[torch.Tensor] = []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lname = name.lower()
        if (p.ndim <= 1 or id(p) in norm_params or any(fnmatch.fnmatch(lname, pat) for pat in patterns)
                or name in named or any(k in name for k in keywords)):
            skip.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **group_options})
    if skip:
        extra = {"layer_adaptation": False} if exclude_from_adaptation else {}
        groups.append({"params": skip, "weight_decay": 0.0, **extra, **group_options})
    return groups
