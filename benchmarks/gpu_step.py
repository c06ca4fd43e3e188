"""Whole optimizer steps on a GPU: eager, host-synchronised, and replayed from a CUDA graph.

    python benchmarks/gpu_step.py [--workloads bert-large,10k-small] [--out runs/gpu_step]

For each workload (parameter shapes of :mod:`mplamb.bench.workloads`) and setup (fp32 parameters;
bf16 parameters, which Lamb gives fp32 masters), times ``opt.step()`` on fixed gradients:

* ``torch AdamW fused`` and the same with ``capturable=True`` replayed from a CUDA graph;
* ``Lamb host-sync``: ``mplamb.Lamb(capturable=False)``, which waits for the gradient pass to
  decide the non-finite skip;
* ``Lamb capturable``: the default on CUDA, no host synchronisation;
* ``Lamb graph``: the capturable step captured once in a ``torch.cuda.CUDAGraph`` and replayed;
* ``Lamb 8bit``, ``Lamb 8bit graph``, ``Lamb 4bit``, ``Lamb bf16 moments``: the lean step
  (``moments=...``, ``master_weights="kahan"``: Kahan-compensated bf16 weights, none for fp32 ones), capturable.

Each time is the median over ``--rounds`` of ``--steps`` back-to-back steps between two CUDA
events (so host overhead that the device cannot hide counts), per step.  The fraction of the
roof is ``40 B/param`` (LAMB's two passes; the gradient pass adds 4 or 2) over that time,
against a device-to-device copy measured in the same run (full-state rows only: a lean step moves fewer bytes,
about 24 B/param with 8-bit moments on fp32 parameters against fused AdamW's 28).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

import mplamb
from mplamb.bench.workloads import WORKLOADS, numel

LAMB_BYTES = 40  # bytes per parameter of LAMB's two fused passes (the yardstick)


def copy_roof(n: int = 1 << 29) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (median of 10)."""
    a, b = torch.empty(n, device="cuda"), torch.rand(n, device="cuda")
    for _ in range(3):
        a.copy_(b)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a.copy_(b)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 8 * n / statistics.median(times)


def make_params(shapes, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, device="cuda", generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(s, device="cuda", generator=g) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def lean(ps, moments: str, lr=1e-3) -> mplamb.Lamb:
    """The lean step: ``moments`` storage, Kahan-compensated weights where they are bf16 (fp32 ones need none)."""
    return mplamb.Lamb(ps, lr=lr, weight_decay=0.01, moments=moments, master_weights="kahan")


CANDIDATES = {
    "torch AdamW fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True), False),
    "torch AdamW fused, graph": (lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device="cuda"),
                                                              weight_decay=0.01, fused=True, capturable=True), True),
    "Lamb host-sync": (lambda ps: mplamb.Lamb(ps, lr=1e-3, weight_decay=0.01, capturable=False), False),
    "Lamb capturable": (lambda ps: mplamb.Lamb(ps, lr=1e-3, weight_decay=0.01), False),
    "Lamb graph": (lambda ps: mplamb.Lamb(ps, lr=torch.tensor(1e-3, device="cuda", dtype=torch.float64),
                                          weight_decay=0.01), True),
    "Lamb 8bit": (lambda ps: lean(ps, "8bit"), False),
    "Lamb 8bit graph": (lambda ps: lean(ps, "8bit", lr=torch.tensor(1e-3, device="cuda", dtype=torch.float64)), True),
    "Lamb 4bit": (lambda ps: lean(ps, "4bit"), False),
    "Lamb bf16 moments": (lambda ps: lean(ps, "bf16"), False),
}


FULL_STATE = ("Lamb host-sync", "Lamb capturable", "Lamb graph")


def time_step(make, graph: bool, shapes, dtype, steps: int, rounds: int) -> float:
    """Milliseconds per step (median over rounds of ``steps`` back-to-back steps)."""
    ps = make_params(shapes, dtype)
    opt = make(ps)
    for _ in range(3):
        opt.step()
    fn = opt.step
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            opt.step()
        fn = g.replay
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(steps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / steps)
    del opt, ps
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="bert-large,10k-small")
    p.add_argument("--setups", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="runs/gpu_step")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    roof = copy_roof()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for w in args.workloads.split(","):
        shapes = WORKLOADS[w]()
        n = numel(shapes)
        for setup in args.setups.split(","):
            times = {name: time_step(make, graph, shapes, dtypes[setup], args.steps, args.rounds)
                     for name, (make, graph) in CANDIDATES.items()}
            for name, ms in times.items():
                rows.append({"workload": w, "setup": setup, "optimizer": name, "ms": ms, "tensors": len(shapes),
                             "params": n, "vs_adamw_fused": ms / times["torch AdamW fused"],
                             "roof_fraction_40B": LAMB_BYTES * n / (ms / 1e3) / roof if name in FULL_STATE
                             else None})
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy roof {roof / 1e9:.0f} GB/s; "
            f"command: python benchmarks/gpu_step.py {' '.join(sys.argv[1:])}")
    lines = [head, "", "| workload | setup | optimizer | ms/step | / AdamW fused | fraction of copy roof (40 B/param) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        frac = "" if r["roof_fraction_40B"] is None else f"{r['roof_fraction_40B']:.2f}"
        lines.append(f"| {r['workload']} ({r['tensors']} tensors) | {r['setup']} | {r['optimizer']} | {r['ms']:.3f} | "
                     f"{r['vs_adamw_fused']:.2f} | {frac} |")
    text = "\n".join(lines)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_step.md").write_text(text + "\n")
    (out / "gpu_step.json").write_text(json.dumps({"header": head, "roof_bytes_per_s": roof, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
