"""mplamb: exact, fast and safe LAMB for mixed-precision training.

* :mod:`mplamb.ops`: MXNet's LAMB operators on PyTorch tensors (``lamb_update_phase1`` ...).
* :class:`mplamb.Lamb`: the ``torch.optim`` optimizer (fp32 masters, loss scaling, clipping).
* :mod:`mplamb.kernels`: the math, once per backend (``reference`` is the source of truth).
"""
from .optimizer import Lamb
from .param_groups import param_groups
from .ops import (
    lamb_update_phase1,
    lamb_update_phase2,
    mp_lamb_update_phase1,
    mp_lamb_update_phase2,
    multi_lamb_update,
    multi_mp_lamb_update,
)

from ._version import __version__

__all__ = [
    "Lamb",
    "param_groups",
    "lamb_update_phase1",
    "lamb_update_phase2",
    "mp_lamb_update_phase1",
    "mp_lamb_update_phase2",
    "multi_lamb_update",
    "multi_mp_lamb_update",
    "__version__",
]
