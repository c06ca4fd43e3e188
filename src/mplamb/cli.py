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
    lean = [s for s in args.lean.split(",") if s]
    try:
        for spec in lean:
            bench.parse_lean(spec)
    except ValueError as e:
        print(f"--lean: {e}", file=sys.stderr)
        return 2
    bar = tqdm(desc="bench", bar_format="{desc}", leave=False) if tqdm else None

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_description_str(msg)

    result = bench.run(workloads, setups, repeats=args.repeats, with_peers=not args.no_peers, backends=backends,
                       progress=progress, device=args.device, mxnet=args.mxnet_python, late_step=args.late_step,
                       lean=lean)
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


def _study(args: argparse.Namespace) -> int:
    from . import study

    overrides = dict(study.QUICK) if args.quick else {}
    for name in ("budget", "base_batch", "seeds", "layers", "dim", "heads", "precision", "device"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.multipliers:
        overrides["multipliers"] = tuple(int(k) for k in args.multipliers.split(","))
    if args.lr_factors:
        overrides["lr_factors"] = tuple(float(f) for f in args.lr_factors.split(","))
    if args.optimizers:
        overrides["optimizers"] = tuple(o.strip() for o in args.optimizers.split(","))
        try:
            for o in overrides["optimizers"]:
                study.optimizer_setting(o)
        except ValueError as e:
            print(f"error: --optimizers: {e}", file=sys.stderr)
            return 2
    cfg = study.StudyConfig(**overrides)
    if cfg.seeds < 1 or cfg.budget < 1 or not cfg.multipliers or not cfg.lr_factors:
        print("error: --seeds, --budget, --multipliers and --lr-factors need positive values", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device is available here", file=sys.stderr)
            return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="run", desc="study", dynamic_ncols=True)

    def progress(label: str, finished: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = finished
            if label:
                bar.set_description_str(f"study: {label}")
            bar.refresh()

    out = pathlib.Path(args.out)
    summary = study.run_study(cfg, out, progress=progress,
                              log=(lambda msg: bar.write(msg)) if bar is not None else print)
    if bar is not None:
        bar.close()
    print(study._table(summary))
    print(f"\nwrote {out / 'study.md'}, {out / 'study.json'}, {out / 'study_loss.png'}, "
          f"{out / 'study_sensitivity.png'} and the runs ({out / 'runs.jsonl'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mplamb",
        description="mplamb: exact, fast and safe LAMB for mixed-precision training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,study}")

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
    bench.add_argument("--lean", default="8bit-kahan",
                       help="comma-separated lean storages <moments>-<master weights> timed on the half-weight setups "
                            "(e.g. 8bit-kahan,4bit-kahan,bf16-fp32; '' for none)")
    bench.add_argument("--no-peers", action="store_true", help="time only mplamb's backends and the roof")
    bench.add_argument("--late-step", type=int, default=None, metavar="T",
                       help="also time every mplamb backend with its step counts starting at T, in rows of their "
                            "own: from t = 356 (beta1 = 0.9) the bias divisor of the mean is exactly 1 and the "
                            "fused kernels skip that division; the peers' step cost does not depend on t")
    bench.add_argument("--out", default="mplamb-report-bench", help="folder for bench.md/json/png")
    bench.set_defaults(func=_bench)

    st = sub.add_parser(
        "study", help="the large-batch study: LAMB against a tuned AdamW as the batch grows, with seeds",
        description="At a fixed token budget, train the main job's model at batch multipliers 1x, 4x, 16x, "
                    "64x with LAMB and AdamW: a sweep of log-spaced learning rates per batch size, then the best "
                    "learning rate of each re-run with more seeds. Reports the final validation loss (mean and "
                    "spread), LAMB - AdamW against the seeds' spread, and the learning-rate sensitivity "
                    "(study.md/json, two plots). Each finished run is appended to runs.jsonl in --out, so an "
                    "interrupted study resumes where it stopped. The defaults take about an hour and a half on "
                    "2 CPU cores; --quick is a tiny version (about half a minute).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    st.add_argument("--quick", action="store_true", help="a tiny study (small model and budget, 2 lrs, 2 seeds)")
    st.add_argument("--budget", type=int, default=None, help="training tokens per run (default 655360)")
    st.add_argument("--base-batch", type=int, default=None, help="sequences per step at 1x (default 4)")
    st.add_argument("--multipliers", default="", help="comma-separated batch multipliers (default 1,4,16,64)")
    st.add_argument("--lr-factors", default="",
                    help="comma-separated factors around each optimizer's sqrt-scaled lr (default 0.25,0.5,1,2,4)")
    st.add_argument("--seeds", type=int, default=None, help="seeds of each best learning rate (default 3)")
    st.add_argument("--optimizers", default="",
                    help="comma-separated optimizers, the first two compared (default lamb,adamw); lamb-<moments>-"
                         "<master weights> is LAMB with lean state, e.g. lamb,lamb-8bit-kahan (LAMB's lr grid)")
    st.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4)")
    st.add_argument("--dim", type=int, default=None, help="model width (default 128)")
    st.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    st.add_argument("--precision", choices=["auto", "bf16", "bf16-weights", "fp32"], default=None,
                    help="as for train (default bf16-weights: the same on every CPU, so a study resumes anywhere)")
    st.add_argument("--device", default="cpu", help="cpu or cuda")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.add_argument("--out", default="mplamb-study", help="folder for runs.jsonl and the report")
    st.set_defaults(func=_study)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
