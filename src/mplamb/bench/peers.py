"""The optimizers mplamb is measured against, each optional (skipped when not installed).

timm's package imports torchvision at import time, which does not load with the pinned
CPU torch; its ``timm/optim/lamb.py`` only needs torch, so it is loaded on its own.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Callable, Dict, Optional

import torch

Factory = Callable[[list], torch.optim.Optimizer]

LR, WD = 1e-3, 0.01


def _timm_lamb() -> Optional[type]:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "_mplamb_timm_optim"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [f"{spec.submodule_search_locations[0]}/optim"]
        sys.modules[name] = pkg
    try:
        return importlib.import_module(f"{name}.lamb").Lamb
    except Exception:  # pragma: no cover - a timm layout we do not know
        return None


def peers() -> Dict[str, Factory]:
    """name -> factory(params) for every peer importable here (all take fp32 params)."""
    out: Dict[str, Factory] = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True),
    }
    try:
        import pytorch_optimizer

        out["pytorch_optimizer Lamb"] = lambda ps: pytorch_optimizer.Lamb(ps, lr=LR, weight_decay=WD)
    except Exception:
        pass
    try:  # 8-bit optimizer state, the peers of Lamb(moments="8bit")
        import bitsandbytes

        out["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=LR, weight_decay=WD)
    except Exception:
        pass
    try:
        from torchao.optim import AdamW8bit as _AoAdamW8bit

        out["torchao AdamW8bit"] = lambda ps: _AoAdamW8bit(ps, lr=LR, weight_decay=WD)
    except Exception:
        pass
    timm_lamb = _timm_lamb()
    if timm_lamb is not None:
        out["timm Lamb"] = lambda ps: timm_lamb(ps, lr=LR, weight_decay=WD)
    try:
        import torch_optimizer

        out["torch-optimizer Lamb"] = lambda ps: torch_optimizer.Lamb(ps, lr=LR, weight_decay=WD)
    except Exception:
        pass
    return out
