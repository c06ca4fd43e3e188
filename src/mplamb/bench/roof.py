"""Memory-bandwidth roofs measured in the same run as the optimizers.

* triad: ``a = b + s * c`` over float32 arrays (STREAM's triad; 12 bytes per element);
* in-place: ``x *= s`` (a read-modify-write pass; 8 bytes per element), the access
  pattern of an optimizer step;
* copy: ``a = b`` (8 bytes per element; on a GPU a device-to-device copy).
All use torch's kernels (multi-threaded on the CPU) on arrays far larger than the caches.
"""
from __future__ import annotations

import torch

BYTES_PER_ELEMENT = {"triad": 12, "inplace": 8, "copy": 8}


class Roof:
    def __init__(self, n: int = 50_000_000, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.a = torch.zeros(n, device=device)
        self.b = torch.rand(n, device=device)
        self.c = torch.rand(n, device=device)

    def triad(self) -> None:
        torch.add(self.b, self.c, alpha=1.0001, out=self.a)

    def inplace(self) -> None:
        self.b.mul_(1.0000001)

    def copy(self) -> None:
        self.a.copy_(self.c)

    def bytes(self, name: str) -> int:
        """Bytes read plus written by one call of roof ``name``."""
        return BYTES_PER_ELEMENT[name] * self.n
