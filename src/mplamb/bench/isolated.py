"""Peers measured in a process of their own: optax's ``lamb`` under ``jax.jit``.

JAX is never imported by the benchmark process (its thread pools and allocator would share the
machine with torch's); :mod:`.optax_child` runs the steps and reports the times as JSON.  Its
steps are not interleaved with the in-process candidates' (no round-robin), so its ratios carry
more of the machine's drift.  Skipped when optax or jax is not installed, and with a note when
a child fails or runs past :data:`TIMEOUT_S` (XLA compiles one program over every tensor: 10,000
tensors take minutes).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from .peers import LR, WD

OPTAX = "optax lamb (jit) [own process]"
TIMEOUT_S = 180


def own_process_peer_available() -> bool:
    return importlib.util.find_spec("optax") is not None and importlib.util.find_spec("jax") is not None


def run_optax(shapes: Sequence[Tuple[int, ...]], repeats: int, notes: List[str], label: str) -> Optional[dict]:
    """``{"times", "warmup_s", "versions"}`` of ``repeats`` optax steps on ``shapes``, or None (and a note)."""
    spec = json.dumps({"shapes": [list(s) for s in shapes], "repeats": repeats, "lr": LR, "wd": WD})
    try:
        done = subprocess.run([sys.executable, "-m", "mplamb.bench.optax_child"], input=spec, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        notes.append(f"{label}: {OPTAX} skipped, it ran past {TIMEOUT_S} s (compilation included)")
        return None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        notes.append(f"{label}: {OPTAX} failed (exit {done.returncode}: {tail[0][:200]})")
        return None
    return json.loads(done.stdout)
