"""The fused CPU lean kernels of this checkout against those of another git revision, step by step in one process.

Run: ``python benchmarks/lean_kernels_ab.py --against REV [--moments 8bit,4bit,bf16] [--rounds 21]``.
BERT-base shapes (109.5M parameters, bf16 weights with Kahan compensation, random gradients), one optimizer per
kernel version and torch's fused AdamW (float32) beside them; each round steps the three in turn (the two
versions swap places every round), so both see the same state of the machine.  Prints the medians and the medians
of the per-round ratios this checkout / ``REV`` and this checkout / fused AdamW.  ``REV``'s ``src/mplamb/kernels/fused_cpu_lean_kernels.py`` is
loaded as a module of this package (its launcher, the rest of mplamb, is this checkout's), so the two must take the
same arguments.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mplamb
from mplamb.bench.workloads import bert_shapes
from mplamb.kernels import fused_cpu

KERNELS = "src/mplamb/kernels/fused_cpu_lean_kernels.py"


def kernels_at(rev: str, folder: Path):
    """``REV``'s lean kernel module, imported as ``mplamb.kernels._lean_kernels_ab`` (relative imports resolve in
    this checkout's ``mplamb.kernels``)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:{KERNELS}"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    path = folder / "_lean_kernels_ab.py"
    path.write_text(source)
    name = "mplamb.kernels._lean_kernels_ab"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mplamb.kernels"
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose lean kernels to compare with")
    parser.add_argument("--moments", default="8bit,4bit,bf16")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = bert_shapes()

    def params(dtype: torch.dtype) -> list:
        ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=dtype) * 1e-3
        return ps

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"this": fused_cpu.KL, args.against: kernels_at(args.against, Path(tmp))}
        adamw = torch.optim.AdamW(params(torch.float32), lr=1e-3, fused=True)
        adamw.step()
        print(f"BERT-base, bf16 weights with Kahan compensation, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds")
        try:
            for moments in args.moments.split(","):
                opts = {}
                for name, module in versions.items():
                    fused_cpu.KL = module
                    opts[name] = mplamb.Lamb(params(torch.bfloat16), lr=1e-3, weight_decay=0.01, moments=moments,
                                             master_weights="kahan", backend="fused_cpu")
                    opts[name].step()  # compiles, creates the state
                times = {name: [] for name in ["adamw", *opts]}
                for r in range(args.rounds):
                    order = ["adamw", *opts] if r % 2 == 0 else ["adamw", *reversed(opts)]
                    for name in order:  # the two versions take turns right after AdamW
                        if name != "adamw":
                            fused_cpu.KL = versions[name]
                        opt = adamw if name == "adamw" else opts[name]
                        start = time.perf_counter()
                        opt.step()
                        times[name].append(time.perf_counter() - start)
                medians = "  ".join(f"{name} {statistics.median(ts) * 1e3:.1f} ms" for name, ts in times.items())
                paired = statistics.median(a / b for a, b in zip(times["this"], times[args.against]))
                vs_adamw = statistics.median(a / b for a, b in zip(times["this"], times["adamw"]))
                print(f"  {moments:5s} {medians}   this / {args.against}: {paired:.3f}   this / adamw: {vs_adamw:.2f}")
                del opts
        finally:
            fused_cpu.KL = versions["this"]


if __name__ == "__main__":
    main()
