"""Peers measured in a process of their own: optax's ``lamb`` under ``jax.jit``, and MXNet 1.9's
``LAMB`` (the optimizer mplamb's operators reproduce).

Each runs a standalone script (:mod:`.optax_child`, :mod:`.mxnet_child`; neither imports torch
or mplamb) that reports its step times as JSON: JAX and MXNet never share the benchmark process
with torch's thread pools and allocator, and MXNet 1.9 needs an interpreter of its own (numpy <
2; ``scripts/setup_mxnet.sh`` makes one).  Their steps are not interleaved with the in-process
candidates' (no round-robin), so their ratios carry more of the machine's drift.  A peer that is
not installed is skipped; a child that fails, runs past :data:`TIMEOUT_S` or needs more than
:func:`memory_cap` bytes of address space leaves a note in the report (XLA compiles one program
over every tensor: 10,000 tensors take minutes and, uncapped, took all 24 GB of this machine's
memory, so that the kernel killed the benchmark process; capped, the child fails alone).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from .peers import LR, WD

OPTAX = "optax lamb (jit) [own process]"
MXNET = "MXNet LAMB [own process]"
TIMEOUT_S = 180
_HERE = os.path.dirname(os.path.abspath(__file__))
MEMORY_FRACTION = 0.5  # of the memory available when the child starts: the most address space it may map


def _available_bytes() -> int:
    """Linux's MemAvailable (physical memory where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_cap() -> int:
    """Bytes of address space a child may use (``RLIMIT_AS``, set by the child itself): a fraction of
    what is available now, so the benchmark process keeps what it holds."""
    return int(_available_bytes() * MEMORY_FRACTION)


def own_process_peer_available() -> bool:
    """optax and jax importable by this interpreter (checked without importing them)."""
    return importlib.util.find_spec("optax") is not None and importlib.util.find_spec("jax") is not None


def mxnet_python(explicit: Optional[str] = None) -> Optional[str]:
    """The interpreter that has MXNet: ``explicit``, else ``$MPLAMB_MXNET_PYTHON``, else
    ``.venv-mxnet/bin/python`` under the current directory if it exists (``scripts/setup_mxnet.sh``)."""
    for candidate in (explicit, os.environ.get("MPLAMB_MXNET_PYTHON"), os.path.join(".venv-mxnet", "bin", "python")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _child(python: str, script: str, spec: dict, notes: List[str], label: str, name: str) -> Optional[dict]:
    cap = memory_cap()
    try:
        done = subprocess.run([python, os.path.join(_HERE, script)], capture_output=True, text=True,
                              input=json.dumps({**spec, "max_bytes": cap}), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        notes.append(f"{label}: {name} skipped, it ran past {TIMEOUT_S} s (compilation included)")
        return None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        notes.append(f"{label}: {name} failed (exit {done.returncode}: {tail[0][:200]}; memory cap "
                     f"{cap / 2**30:.1f} GiB)")
        return None
    return json.loads(done.stdout)


def run_optax(shapes: Sequence[Tuple[int, ...]], repeats: int, notes: List[str], label: str) -> Optional[dict]:
    """``{"times", "warmup_s", "versions"}`` of ``repeats`` optax steps on float32 ``shapes``, or None (and a note)."""
    spec = {"shapes": [list(s) for s in shapes], "repeats": repeats, "lr": LR, "wd": WD}
    return _child(sys.executable, "optax_child.py", spec, notes, label, OPTAX)


def run_mxnet(python: str, shapes: Sequence[Tuple[int, ...]], repeats: int, mp: bool, notes: List[str],
              label: str) -> Optional[dict]:
    """The same for MXNet's LAMB, float32 or (``mp``) float16 with float32 masters, run by ``python``."""
    spec = {"shapes": [list(s) for s in shapes], "repeats": repeats, "lr": LR, "wd": WD, "mp": mp}
    return _child(python, "mxnet_child.py", spec, notes, label, MXNET)
