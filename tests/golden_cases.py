"""Loading and comparing the MXNet 1.9.1 golden cases of ``tests/golden`` (spec: NOTES.md there)."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"

_NP_TO_TORCH = {
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("float64"): torch.float64,
}


@dataclass
class Case:
    name: str
    meta: dict
    arrays: Dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def op(self) -> str:
        return self.meta.get("op", "")

    @property
    def kwargs(self) -> dict:
        return dict(self.meta.get("kwargs", {}))

    @property
    def error(self):
        return self.meta.get("error")

    def tensor(self, key: str) -> torch.Tensor:
        a = self.arrays[key]
        return torch.from_numpy(a.copy())

    def inputs(self) -> Dict[str, torch.Tensor]:
        return {name: self.tensor(f"in__{name}") for name in self.meta["inputs"]}


def load(name: str) -> Case:
    with np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    meta = json.loads(str(arrays.pop("meta")))
    return Case(name=name, meta=meta, arrays=arrays)


def names(predicate=lambda case: True) -> List[str]:
    out = []
    for path in sorted(GOLDEN_DIR.glob("*.npz")):
        case = load(path.stem)
        if predicate(case):
            out.append(path.stem)
    return out


_ALL = None


def all_cases() -> List[Case]:
    global _ALL
    if _ALL is None:
        _ALL = [load(p.stem) for p in sorted(GOLDEN_DIR.glob("*.npz"))]
    return _ALL


# ---------------------------------------------------------------- comparisons

def _bits(x: np.ndarray) -> np.ndarray:
    itype = {2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]
    return x.view(itype).astype(np.int64)


def ulp_distance(actual, expected) -> int:
    """Largest distance in units of the last place (NaN matches NaN; -0 and +0 are 0 apart)."""
    a = np.asarray(actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual)
    e = np.asarray(expected)
    assert a.dtype == e.dtype, f"dtype {a.dtype} != expected {e.dtype}"
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return 0
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        return np.iinfo(np.int64).max
    ok = ~nan_a
    ia, ie = _bits(a[ok]), _bits(e[ok])
    mask = np.int64((1 << (8 * a.dtype.itemsize - 1)) - 1)
    # map sign-magnitude bit patterns onto a monotone integer line (-0 and +0 both map to 0)
    ia = np.where(ia < 0, -(ia & mask), ia)
    ie = np.where(ie < 0, -(ie & mask), ie)
    return int(np.abs(ia - ie).max()) if ia.size else 0


def assert_exact(actual, expected, what: str) -> None:
    d = ulp_distance(actual, expected)
    assert d == 0, f"{what}: {d} ULP from MXNet (expected bit-exact)"


def nrel(actual, expected) -> float:
    """max|a - e| / max|e| over finite entries (NaN positions must agree)."""
    a = np.asarray(actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert (np.isnan(a) == np.isnan(e)).all(), "NaN positions differ"
    fin = np.isfinite(e)
    assert (a[~fin] == e[~fin]).all() or np.isnan(e[~fin]).all(), "non-finite entries differ"
    if not fin.any():
        return 0.0
    scale = np.abs(e[fin]).max()
    diff = np.abs(a[fin] - e[fin]).max()
    return float(diff / scale) if scale > 0 else float(diff)


def steprel(actual, expected, before) -> float:
    """max|a - e| / max|e - before| over finite entries (NaN positions must agree): how wrong the step is."""
    a = np.asarray(actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    b = np.asarray(before, dtype=np.float64)
    assert (np.isnan(a) == np.isnan(e)).all(), "NaN positions differ"
    fin = np.isfinite(e) & np.isfinite(b)
    if not fin.any():
        return 0.0
    step = np.abs(e[fin] - b[fin]).max()
    diff = np.abs(a[fin] - e[fin]).max()
    return float(diff / step) if step > 0 else float(diff)
