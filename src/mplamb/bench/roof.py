"""Memory-bandwidth roofs measured in the same run as the optimizers.

* triad: ``a = b + s * c`` over float32 arrays (STREAM's triad; 12 bytes per element);
* in-place: ``x *= s`` (a read-modify-write pass; 8 bytes per element), the access
  pattern of an optimizer step.
Both use torch's multi-threaded kernels on arrays far larger than the caches.
"""
from __future__ import annotations

import torch


class Roof:
    def __init__(self, n: int = 50_000_000) -> None:
        self.n = n
        self.a = torch.zeros(n)
        self.b = torch.rand(n)
        self.c = torch.rand(n)

    def triad(self) -> None:
        torch.add(self.b, self.c, alpha=1.0001, out=self.a)

    def inplace(self) -> None:
        self.b.mul_(1.0000001)

    @property
    def triad_bytes(self) -> int:
        return 12 * self.n

    @property
    def inplace_bytes(self) -> int:
        return 8 * self.n
