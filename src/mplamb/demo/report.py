"""The training report: loss curves, the per-layer trust-ratio heatmap, metrics as CSV/JSON."""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Dict, List, Optional

__all__ = ["write_metrics", "plot_losses", "plot_trust_ratios", "summary_table", "precision_text"]


def write_metrics(out: pathlib.Path, runs: Dict[str, dict]) -> None:
    """``metrics.json`` (everything) and ``metrics.csv`` (one row per logged step and optimizer)."""
    (out / "metrics.json").write_text(json.dumps(runs, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "step", "tokens", "train_loss", "val_loss", "lr", "grad_norm"])
        for name, run in runs.items():
            val = {s: v for s, v in zip(run["val_steps"], run["val_loss"])}
            for i, step in enumerate(run["steps"]):
                w.writerow([name, step, run["tokens"][i], f"{run['train_loss'][i]:.6f}",
                            f"{val[step]:.6f}" if step in val else "", f"{run['lr'][i]:.6g}",
                            f"{run['grad_norm'][i]:.6g}"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(out: pathlib.Path, runs: Dict[str, dict], unigram: float) -> pathlib.Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"lamb": "tab:red", "adamw": "tab:blue"}
    for name, run in runs.items():
        c = colors.get(name, None)
        ax.plot(run["steps"], run["train_loss"], color=c, alpha=0.35, linewidth=1, label=f"{name} train")
        ax.plot(run["val_steps"], run["val_loss"], color=c, marker="o", markersize=3, linewidth=2,
                label=f"{name} validation")
    ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trust_ratios(out: pathlib.Path, run: dict) -> Optional[pathlib.Path]:
    """Heatmap: one row per parameter (model order), one column per logged step, colour = trust ratio."""
    ratios: List[List[float]] = run.get("trust_ratio") or []
    if not ratios:
        return None
    import numpy as np

    plt = _plt()
    data = np.asarray(ratios, dtype=np.float64).T  # (params, steps)
    names = run["param_names"]
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.16 * len(names) + 1.2)))
    positive = data[data > 0]
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=max(positive.min(), 1e-3), vmax=positive.max()) if positive.size else None
    im = ax.imshow(np.where(data > 0, data, np.nan), aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=norm, extent=(run["steps"][0] - 0.5, run["steps"][-1] + 0.5, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("LAMB trust ratio ||w|| / ||update|| per parameter (log colour scale)")
    fig.colorbar(im, ax=ax, label="trust ratio")
    fig.tight_layout()
    path = out / "trust_ratio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def precision_text(run: dict) -> str:
    """The run's precision policy in words, e.g. ``bf16 (bf16 autocast; bf16 weights, fp32 masters)``."""
    p = run.get("precision") or {}
    if not p:
        return run.get("config", {}).get("precision", "?")
    weights = f"{p['weights']} weights" + (f", {p['masters']} masters" if p.get("masters") else "")
    if p.get("masters") == "Kahan-compensated":
        weights = f"Kahan-compensated {p['weights']} weights"
    moments = p.get("moments", "fp32")
    return f"{p['policy']} ({p['compute']} compute; {weights}; {moments} moments)"


def summary_table(runs: Dict[str, dict], unigram: float) -> str:
    """The report's table, one row per optimizer, and a note on how speed is measured."""
    lines = ["| optimizer | precision | steps | tokens | final train loss | final val loss | val loss vs unigram | "
             "optimizer state B/param | training state MB | peak MB | tokens/s | warm-up s | skipped steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        rate = run.get("tokens_per_s")
        mem = run.get("memory") or {}
        per = mem.get("state_bytes_per_param")
        total = mem.get("training_state_bytes")
        peak = mem.get("peak_bytes")
        lines.append(f"| {name} | {precision_text(run)} | {run['steps'][-1]} | {run['tokens'][-1]:,} | "
                     f"{run['train_loss'][-1]:.3f} | {run['val_loss'][-1]:.3f} | {run['val_loss'][-1] - unigram:+.3f} | "
                     f"{'n/a' if per is None else f'{per:.2f}'} | {'n/a' if total is None else f'{total / 1e6:.2f}'} | "
                     f"{'n/a' if peak is None else f'{peak / 1e6:.1f}'} | "
                     f"{'n/a' if rate is None else f'{rate:.0f}'} | {run.get('warmup_s', 0.0):.1f} | "
                     f"{run['skipped_steps']} | {run['wall_s']:.1f} |")
    lines.append("")
    lines.append("tokens/s: training steps after warm-up only (no evaluation or checkpointing); warm-up s: compiling "
                 "the fused kernels ahead of training, and the first step, of each run or resume; wall s: everything. "
                 "Optimizer state B/param: moments (or their codes and scales), master weights or compensations, "
                 "counted from the tensors; training state MB: weights, gradients and optimizer state; peak MB: on a GPU "
                 "the allocator's peak above the memory allocated before the model was built, on the CPU the training "
                 "state plus the largest growth of resident memory within a training step after the first "
                 "(activations, temporaries).")
    if len(runs) > 1:
        first, *rest = list(runs)
        for other in rest:
            d = runs[first]["val_loss"][-1] - runs[other]["val_loss"][-1]
            lines.append(f"Final validation loss, {first} minus {other}: {d:+.4f} nats/byte.")
    return "\n".join(lines)
