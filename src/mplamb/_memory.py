"""Peak memory of a piece of work, for the reports of the main job and the bench.

On a GPU: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated at
the start, exact for tensors.  On the CPU (Linux): the process's resident high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) above its resident size at the start, which counts tensors and
everything else the work allocates (Python objects, compiled code); ``None`` where ``/proc`` is not there.
"""
from __future__ import annotations

import ctypes
import gc
from typing import Optional

import torch

__all__ = ["PeakMemory", "trim_heap"]


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so that what follows starts from
    what this process really holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """``start()``, then the work, then ``extra_bytes()``: the peak memory the work added (bytes), or ``None`` where
    it cannot be measured.  ``reset_peak()`` forgets the peak so far (e.g. a compilation before the steady state)
    while keeping the starting point."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self._base: Optional[float] = None

    def start(self, collect: bool = True) -> "PeakMemory":
        """Take the starting point (on the CPU after a garbage collection, unless ``collect`` is False because the
        caller has just collected: a full collection walks every object of the process)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
        else:
            if collect:
                gc.collect()
            trim_heap()
            kb = _status_kb("VmRSS")
            self._base = None if kb is None else kb * 1024.0
        self.reset_peak()
        return self

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            self._base = None

    def extra_bytes(self) -> Optional[float]:
        if self._base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
        else:
            kb = _status_kb("VmHWM")
            if kb is None:
                return None
            peak = kb * 1024.0
        return max(0.0, peak - self._base)
