"""Side-by-side optimizer-step benchmarks: mplamb's backends, the peers and the bandwidth roofs,
in one process, round-robin (every repeat times every candidate once, so machine drift is
shared), medians and quartiles reported."""
from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import mplamb
from mplamb._memory import PeakMemory, trim_heap
from mplamb.kernels import available_backends, get_backend

from .isolated import MXNET, OPTAX, mxnet_python, own_process_peer_available, run_mxnet, run_optax
from .peers import LR, WD, peers
from .report import late_name
from .roof import Roof
from .workloads import WORKLOADS, numel

# Bytes a step must move per parameter (reads + writes), by setup: the measure of "fraction of roof".
LAMB_BYTES = 40  # two passes: fp32 (4+4+4+4 read, 4+4 written; 4+4+4 read, 4 written), mp likewise
ADAMW_BYTES = 28  # one pass: grad, param, exp_avg, exp_avg_sq read; param and both moments written

LEAN_DEFAULT = ("8bit-kahan",)  # lean storages timed on half-weight setups: "<moments>-<master weights>"


def lean_bytes(dtype: torch.dtype, moments: str, master_weights: str) -> float:
    """Bytes per parameter the two passes of a lean step move at least (``master_weights``: fp32, kahan,
    none): phase 1 reads the gradient, both moments and the decay source and writes both moments;
    phase 2 reads both moments and the decay source and writes the weight and its master or compensation."""
    e = torch.empty((), dtype=dtype).element_size()
    half = dtype in (torch.bfloat16, torch.float16)
    c = {"fp32": 4.0, "bf16": 2.0, "8bit": 1.0, "4bit": 0.5}[moments]
    kahan, master = half and master_weights == "kahan", half and master_weights == "fp32"
    source = e + e if kahan else (4 if master else e)
    written = e + e if kahan else (4 + e if master else e)
    return e + 4 * c + source + 2 * c + source + written


def parse_lean(spec: str) -> Tuple[str, str]:
    """``"8bit-kahan"`` -> ``("8bit", "kahan")`` (raises ValueError on anything else)."""
    parts = spec.split("-")
    if len(parts) != 2 or parts[0] not in ("fp32", "bf16", "8bit", "4bit") or parts[1] not in ("fp32", "kahan", "none"):
        raise ValueError(f"lean storage {spec!r}: expected <fp32|bf16|8bit|4bit>-<fp32|kahan|none>, e.g. 8bit-kahan")
    return parts[0], parts[1]


SETUPS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # mplamb params (+ fp32 masters)


@dataclass
class Row:
    workload: str
    setup: str
    name: str
    param_dtype: str
    times: List[float] = field(default_factory=list)
    bytes_per_param: Optional[int] = None
    warmup_s: float = 0.0
    peak_extra_mb: Optional[float] = None
    interleaved: bool = True  # timed round-robin with the other in-process candidates (times[r]: round r)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        ts = sorted(self.times)
        return ts[min(len(ts) - 1, max(0, round(q * (len(ts) - 1))))]

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median, p25_s=self.quantile(0.25), p75_s=self.quantile(0.75))
        return d


def peak_extra_mb(fn: Callable[[], None], device: torch.device = torch.device("cpu"),
                  collect: bool = True) -> Optional[float]:
    """Peak memory added while ``fn`` runs (:class:`mplamb._memory.PeakMemory`: device memory on a GPU,
    resident memory on the CPU; ``collect``: garbage-collect first)."""
    tracker = PeakMemory(device).start(collect=collect)
    fn()
    extra = tracker.extra_bytes()
    return None if extra is None else extra / 2**20


def machine(device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, object] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "mplamb": mplamb.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for mod in ("numba", "triton", "pytorch_optimizer", "torch_optimizer", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    for dist in ("optax", "jax"):  # versions only: jax is never imported here (see .isolated)
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def _params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype)) for s in shapes]


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device's queued work included (synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# The roof an optimizer step is measured against: on the CPU an in-place read-modify-write pass
# (an optimizer's access pattern), on a GPU a device-to-device copy (the yardstick).
ROOF = {"cpu": "inplace", "cuda": "copy"}
ROOF_LABEL = {"inplace": "in-place", "copy": "copy", "triad": "triad"}


def run(workloads: List[str], setups: List[str], repeats: int = 7, with_peers: bool = True,
        backends: Optional[List[str]] = None, progress: Optional[Callable[[str], None]] = None,
        roof_elements: Optional[int] = None, device: str = "cpu", mxnet: Optional[str] = None,
        late_step: Optional[int] = None, lean: Sequence[str] = LEAN_DEFAULT) -> dict:
    """Benchmark every candidate on every (workload, setup) on ``device``; returns a JSON-ready dict.

    ``late_step``: every mplamb backend is timed a second time, in a row of its own, with its step
    counts starting at ``late_step`` (a step's cost depends on t: the fused kernels skip the bias
    divisions once their divisors are exactly 1).  The peers' cost does not depend on t.

    ``lean``: lean storages (``"8bit-kahan"``: ``Lamb(moments="8bit", master_weights="kahan")``) timed on
    every half-weight setup with each backend that steps lean state (``LEAN``).

    With peers on the CPU, optax (if installed) and MXNet (if ``mxnet`` or :func:`.isolated.mxnet_python`
    finds an interpreter with it) are timed in processes of their own."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    backends = backends or available_backends(dev)
    roof = Roof(roof_elements or (50_000_000 if dev.type == "cpu" else 256 * 2**20), dev)
    rows: List[Row] = []
    roof_rows = {"triad": Row("roof", "-", "STREAM triad", "float32", bytes_per_param=12),
                 "inplace": Row("roof", "-", "in-place pass", "float32", bytes_per_param=8),
                 "copy": Row("roof", "-", "copy", "float32", bytes_per_param=8)}
    notes: List[str] = []
    own_versions: Dict[str, str] = {}  # what the own-process peers reported
    mx_python = mxnet_python(mxnet) if with_peers and dev.type == "cpu" else None
    for wl in workloads:
        shapes = WORKLOADS[wl]()
        n = numel(shapes)
        isolated = None  # the own-process peer's row of this workload (fp32 params: shared by every setup)
        if with_peers and dev.type == "cpu" and own_process_peer_available():
            if progress:
                progress(f"{wl}: {OPTAX} in its own process")
            isolated = run_optax(shapes, repeats, notes, wl)
            own_versions.update(isolated["versions"] if isolated else {})
        for setup in setups:
            dtype = SETUPS[setup]
            gen = torch.Generator().manual_seed(1)
            grads32 = [(torch.randn(s, generator=gen) * 1e-3).to(dev) for s in shapes]
            cands = []
            late = set()  # the optimizers whose step counts jump to late_step after the warm-up
            for b in backends:
                for start in [1] + ([late_step] if late_step else []):
                    ps = _params(shapes, dtype, dev)
                    gd = grads32 if dtype == torch.float32 else [g.to(dtype) for g in grads32]
                    for p, g in zip(ps, gd):
                        p.grad = g
                    opt = mplamb.Lamb(ps, lr=LR, weight_decay=WD, backend=b)
                    name = f"mplamb Lamb [{b}]" if start == 1 else late_name(f"mplamb Lamb [{b}]", start)
                    cands.append((Row(wl, setup, name, str(dtype).replace("torch.", ""),
                                      bytes_per_param=LAMB_BYTES), opt))
                    if start != 1:
                        late.add(id(opt))
            if dtype != torch.float32:
                for spec in lean:
                    moments, mw = parse_lean(spec)
                    for b in backends:
                        if not getattr(get_backend(b, dev), "LEAN", False):
                            continue
                        ps = _params(shapes, dtype, dev)
                        for p, g in zip(ps, grads32):
                            p.grad = g.to(dtype)
                        opt = mplamb.Lamb(ps, lr=LR, weight_decay=WD, backend=b, moments=moments,
                                          master_weights={"fp32": None, "kahan": "kahan", "none": False}[mw])
                        cands.append((Row(wl, setup, f"mplamb Lamb [{b}] {moments} moments, {mw} weights",
                                          str(dtype).replace("torch.", ""),
                                          bytes_per_param=lean_bytes(dtype, moments, mw)), opt))
            if with_peers:
                for name, make in peers().items():
                    ps = _params(shapes, torch.float32, dev)
                    for p, g in zip(ps, grads32):
                        p.grad = g
                    cands.append((Row(wl, setup, name, "float32",
                                      bytes_per_param=ADAMW_BYTES if "AdamW" in name else None), make(ps)))
            for row, opt in cands:  # warm-up (compilation, lazy state)
                if progress:
                    progress(f"{wl}/{setup}: warm-up {row.name}")
                row.warmup_s = _timed(opt.step, dev)
                if id(opt) in late:
                    for st in opt.state.values():
                        st["step"] = late_step - 1
            for r in range(repeats):
                for row, opt in cands:
                    if progress:
                        progress(f"{wl}/{setup}: repeat {r + 1}/{repeats} {row.name}")
                    row.times.append(_timed(opt.step, dev))
                roof.triad()
                for name, row in roof_rows.items():
                    row.times.append(_timed(getattr(roof, name), dev))
            gc.collect()  # once: a step leaves no garbage to speak of, and each collection walks the whole heap
            for row, opt in cands:
                row.peak_extra_mb = peak_extra_mb(opt.step, dev, collect=False)
            if isolated is not None:
                cands.append((Row(wl, setup, OPTAX, "float32", times=list(isolated["times"]),
                                  warmup_s=isolated["warmup_s"], interleaved=False), None))
            if mx_python is not None:  # MXNet has no bf16 LAMB: its float16 + float32-master route for both
                if progress:
                    progress(f"{wl}/{setup}: {MXNET}")
                mx = run_mxnet(mx_python, shapes, repeats, setup != "fp32", notes, f"{wl}/{setup}")
                if mx is not None:
                    own_versions.update(mx["versions"])
                    cands.append((Row(wl, setup, MXNET, "float32" if setup == "fp32" else "float16",
                                      times=list(mx["times"]), warmup_s=mx["warmup_s"], interleaved=False), None))
            for row, _ in cands:
                rows.append(row)
                row._n = n  # type: ignore[attr-defined]
                row._tensors = len(shapes)  # type: ignore[attr-defined]
            del cands
            gc.collect()
            trim_heap()
    bandwidth = {name: roof.bytes(name) / row.median for name, row in roof_rows.items()}
    roof_bw = bandwidth[ROOF[dev.type]]
    out_rows = []
    for row in rows:
        d = row.as_dict()
        n = row._n  # type: ignore[attr-defined]
        d["params"] = n
        d["tensors"] = row._tensors  # type: ignore[attr-defined]
        d["ns_per_param"] = row.median / n * 1e9
        if row.bytes_per_param:
            d["gb_per_s"] = row.bytes_per_param * n / row.median / 1e9
            d["fraction_of_roof"] = d["gb_per_s"] * 1e9 / roof_bw
        out_rows.append(d)
    return {"machine": {**machine(dev), **own_versions}, "device": dev.type, "repeats": repeats, "notes": notes,
            "late_step": late_step,
            "roof": ROOF_LABEL[ROOF[dev.type]], "roof_gb_per_s": roof_bw / 1e9,
            **{f"{name}_gb_per_s": bw / 1e9 for name, bw in bandwidth.items()}, "rows": out_rows}
