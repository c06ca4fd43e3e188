"""The command line: ``python -m mplamb train`` (the main job) and ``python -m mplamb bench``."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import List, Optional


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .kernels import available_backends

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    workloads = args.workloads.split(",")
    setups = args.setups.split(",")
    for w in workloads:
        if w not in bench.WORKLOADS:
            print(f"--workloads: unknown workload {w!r} (choose from {', '.join(bench.WORKLOADS)})", file=sys.stderr)
            return 2
    for s in setups:
        if s not in bench.SETUPS:
            print(f"--setups: unknown setup {s!r} (choose from {', '.join(bench.SETUPS)})", file=sys.stderr)
            return 2
    if args.mxnet_python is not None and not pathlib.Path(args.mxnet_python).exists():
        print(f"--mxnet-python: {args.mxnet_python} does not exist (scripts/setup_mxnet.sh makes .venv-mxnet)",
              file=sys.stderr)
        return 2
    if args.late_step is not None and args.late_step < 2:
        print(f"--late-step: expected a step count >= 2, got {args.late_step}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    backends = args.backends.split(",") if args.backends else available_backends(args.device)
    bar = tqdm(desc="bench", bar_format="{desc}", leave=False) if tqdm else None

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_description_str(msg)

    result = bench.run(workloads, setups, repeats=args.repeats, with_peers=not args.no_peers, backends=backends,
                       progress=progress, device=args.device, mxnet=args.mxnet_python, late_step=args.late_step)
    if bar is not None:
        bar.close()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = "python -m mplamb bench " + " ".join(sys.argv[2:])
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    text = bench.table(result)
    (out / "bench.md").write_text(text + "\n")
    try:
        bench.chart(result, str(out / "bench.png"))
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)
    print(text)
    print(f"\nwrote {out / 'bench.md'}, {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mplamb",
        description="mplamb: exact, fast and safe LAMB for mixed-precision training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench}")

    from .train import add_train_arguments

    train = sub.add_parser(
        "train", help="train a small byte-level transformer LM with mplamb.Lamb and write a report with plots",
        description="Train a small byte-level transformer language model in bf16 mixed precision with "
                    "mplamb.Lamb (fp32 master weights), on text that ships with Python (its standard "
                    "library's source) or on --data FILE. Writes loss curves, a per-layer trust-ratio "
                    "heatmap, metrics (CSV/JSON) and checkpoints to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(train)
    train.set_defaults(func=_train)

    bench = sub.add_parser(
        "bench", help="time an optimizer step of mplamb's backends against other optimizers and the bandwidth roof",
        description="Side-by-side step-time benchmark in one process, round-robin: mplamb's backends, torch "
                    "AdamW (foreach, fused), and the LAMBs of pytorch_optimizer, timm and torch-optimizer "
                    "where installed, with measured bandwidth roofs (STREAM triad, in-place pass, copy). On the "
                    "CPU, optax's lamb (where optax and jax are installed) and MXNet 1.9's LAMB (--mxnet-python) "
                    "are timed in processes of their own. --device cuda times the Triton backend on a GPU "
                    "against a device-to-device copy. Prints a table and writes bench.md, bench.json and "
                    "bench.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--workloads", default="bert-base,one-50m,10k-small",
                       help="comma-separated: bert-base (199 tensors, 109.5M params), bert-large, one-50m, 10k-small")
    bench.add_argument("--setups", default="fp32,bf16",
                       help="comma-separated: fp32 params, or bf16 / fp16 params with fp32 master weights (peers stay fp32)")
    bench.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer (round-robin)")
    bench.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: Triton backend, copy roof)")
    bench.add_argument("--mxnet-python", default=None, metavar="PYTHON",
                       help="an interpreter with MXNet 1.9 to time its LAMB in its own process (default: "
                            "$MPLAMB_MXNET_PYTHON, else .venv-mxnet/bin/python if it exists; scripts/setup_mxnet.sh)")
    bench.add_argument("--backends", default="", help="mplamb backends to time (default: all available)")
    bench.add_argument("--no-peers", action="store_true", help="time only mplamb's backends and the roof")
    bench.add_argument("--late-step", type=int, default=None, metavar="T",
                       help="also time every mplamb backend with its step counts starting at T, in rows of their "
                            "own: from t = 356 (beta1 = 0.9) the bias divisor of the mean is exactly 1 and the "
                            "fused kernels skip that division; the peers' step cost does not depend on t")
    bench.add_argument("--out", default="mplamb-report-bench", help="folder for bench.md/json/png")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
