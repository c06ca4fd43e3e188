"""Is a step bound by memory or by arithmetic?  Fused AdamW and mplamb's fused_cpu passes timed on a
tensor that stays in cache and on one that streams from DRAM, round-robin in one process.

Run: ``python benchmarks/compute_bound.py [--sizes 1048576 50000000] [--repeats 15] [--start-step 20000]``.

A pass whose time per parameter is the same in cache as from DRAM is bound by its arithmetic; one
that is much faster in cache is bound by memory.  mplamb's three passes (the gradient norms, phase
1 and phase 2) are timed apart by wrapping the numba kernels; "kernels" is their sum, "step" the
whole ``Lamb.step`` (with its per-step Python work, about 0.5 ms).  AdamW's "kernels" is
``torch._fused_adamw_`` called directly, its "step" ``AdamW.step``.  ``torch addcmul_`` (``w += c * m * v``)
reads three tensors and writes one in place, as phase 2 of a float32 step does: the bandwidth torch
itself gets from that access pattern.  ``--start-step`` sets the
step count of the timed steps (from t = 17,321 no bias division is left; see
``mplamb.kernels.fused_cpu.bias_regime``).  Medians of ``--repeats`` round-robin rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import mplamb
from mplamb.kernels import fused_cpu

ADAMW = "torch AdamW(fused) fp32"
PASSES = {"grad_sumsq_pass": "grad norms", "phase1_pass": "phase 1", "phase2_inplace_pass": "phase 2",
          "phase2_master_pass": "phase 2"}


def _wrap_kernels(sink: Dict[str, float]) -> None:
    """Add each fused_cpu kernel's wall time of the current step to ``sink`` (by pass name)."""
    for name, label in PASSES.items():
        kernel = getattr(fused_cpu.K, name)

        def timed(*args, _kernel=kernel, _label=label):
            start = time.perf_counter()
            out = _kernel(*args)
            sink[_label] = sink.get(_label, 0.0) + time.perf_counter() - start
            return out

        setattr(fused_cpu.K, name, timed)


def _param(n: int, dtype: torch.dtype) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    p.grad = (torch.randn(n) * 1e-2).to(dtype)
    return p


def measure(n: int, repeats: int, start_step: int, sink: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """ns per parameter of each timed quantity at size ``n`` (medians over the rounds)."""
    adamw = torch.optim.AdamW([_param(n, torch.float32)], lr=1e-3, fused=True)
    lambs = {dt: mplamb.Lamb([_param(n, dt)], lr=1e-3, weight_decay=0.01, backend="fused_cpu")
             for dt in (torch.float32, torch.bfloat16)}
    for opt in (adamw, *lambs.values()):
        opt.step()
    for opt in lambs.values():
        for st in opt.state.values():
            st["step"] = start_step - 1
    inner = max(1, int(2**22 // n))  # steps per timing: at least ~4M parameters' worth
    samples: Dict[str, Dict[str, List[float]]] = {}

    def timed(key: str, fn: Callable[[], None], whole_step: bool = True) -> None:
        """One round of ``fn`` into row ``key``: a whole step ("step", and mplamb's passes from the
        wrapped kernels), or a kernel or op alone (its time is the row's "kernels")."""
        sink.clear()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        seconds = (time.perf_counter() - start) / inner
        row = samples.setdefault(key, {})
        if not whole_step:
            row.setdefault("kernels", []).append(seconds)
            return
        row.setdefault("step", []).append(seconds)
        for label, total in sink.items():
            row.setdefault(label, []).append(total / inner)
        if sink:
            row.setdefault("kernels", []).append(sum(sink.values()) / inner)

    (p,) = adamw.param_groups[0]["params"]
    st = adamw.state[p]

    def adamw_kernel() -> None:  # the fused kernel alone: what the "kernels" column means for AdamW
        torch._fused_adamw_([p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]], lr=1e-3,
                            beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)

    w, m, v = (torch.randn(n) * 1e-3 for _ in range(3))

    def pattern() -> None:  # phase 2's memory access pattern in one torch op: 3 streams read, 1 written in place
        w.addcmul_(m, v, value=1e-9)

    for _ in range(repeats):
        timed(ADAMW, adamw.step)
        timed(ADAMW, adamw_kernel, whole_step=False)
        timed("torch addcmul_ (phase 2's access pattern, fp32)", pattern, whole_step=False)
        for dt, opt in lambs.items():
            timed("mplamb fused_cpu " + ("fp32" if dt == torch.float32 else "bf16 + fp32 masters"), opt.step)
    return {key: {q: statistics.median(v) / n * 1e9 for q, v in row.items()} for key, row in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2**18, 2**20, 5e7])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--start-step", type=int, default=20_000)
    args = parser.parse_args()
    if not fused_cpu.AVAILABLE:
        raise SystemExit("fused_cpu needs numba (pip install 'mplamb[fast]')")
    torch.manual_seed(0)
    sink: Dict[str, float] = {}
    _wrap_kernels(sink)
    cols = ["grad norms", "phase 1", "phase 2", "kernels", "step"]
    print(f"ns per parameter, medians of {args.repeats} round-robin rounds, {torch.get_num_threads()} threads, "
          f"mplamb from t = {args.start_step}\n")
    print("| parameters | optimizer | " + " | ".join(cols) + " | kernels / AdamW kernel | step / AdamW step |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for n in (int(s) for s in args.sizes):
        rows = measure(n, args.repeats, args.start_step, sink)
        base = rows[ADAMW]
        for key, row in rows.items():
            cells = " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in cols)
            step_ratio = f"{row['step'] / base['step']:.2f}" if "step" in row else "-"
            print(f"| {n:,} | {key} | {cells} | {row['kernels'] / base['kernels']:.2f} | {step_ratio} |")


if __name__ == "__main__":
    main()
