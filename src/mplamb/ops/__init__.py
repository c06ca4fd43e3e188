"""MXNet-compatible LAMB operators (names, defaults and in-place semantics of MXNet 1.9.1)."""
from .multi import multi_lamb_update, multi_mp_lamb_update
from .phase import lamb_update_phase1, lamb_update_phase2, mp_lamb_update_phase1, mp_lamb_update_phase2

__all__ = [
    "lamb_update_phase1",
    "lamb_update_phase2",
    "mp_lamb_update_phase1",
    "mp_lamb_update_phase2",
    "multi_lamb_update",
    "multi_mp_lamb_update",
]
