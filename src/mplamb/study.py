"""The large-batch study: at a fixed token budget, does LAMB beat a *tuned* AdamW as the batch grows?

``python -m mplamb study`` trains the main job's model on the main job's data
(:mod:`mplamb.train`) at batch sizes ``k * base_batch`` for ``k`` in ``multipliers``, every run
with the same number of training tokens (``steps = budget / (batch * context)``), the same
schedule (linear warm-up over 10% of the steps, then cosine decay to 10%) and global-norm
clipping at 1.0, for each optimizer:

1. **sweep**: ``len(lr_factors)`` log-spaced peak learning rates per optimizer and batch size,
   ``lr = base_lr[opt] * sqrt(k) * f`` (the square-root rule only centres the grid), seed 0;
2. **seeds**: the best learning rate of each (optimizer, batch size) re-run with seeds
   ``1 .. seeds-1``.

Each finished run is appended to ``runs.jsonl`` in the output folder at once, so a killed study
resumes where it stopped and re-running skips finished runs (a run is identified by its
optimizer, batch multiplier, learning rate and seed, and by the settings that change its result,
which must match).  The report (``study.md``, ``study.json``, ``study_loss.png``,
``study_sensitivity.png``) gives, per batch size, each optimizer's best learning rate, the mean
and standard deviation of the final validation loss over the seeds, and LAMB - AdamW against
the seeds' spread: a *win* or *loss* only when the difference exceeds twice the larger of the
two standard deviations, a *tie* otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["StudyConfig", "QUICK", "plan_sweep", "run_study", "summarise", "report"]


@dataclass
class StudyConfig:
    budget: int = 655_360  # training tokens per run
    base_batch: int = 4  # sequences per step at multiplier 1
    multipliers: Tuple[int, ...] = (1, 4, 16, 64)
    context: int = 128
    optimizers: Tuple[str, ...] = ("lamb", "adamw")
    base_lr: Tuple[Tuple[str, float], ...] = (("lamb", 0.01), ("adamw", 1.5e-3))  # grid centre at multiplier 1
    lr_factors: Tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # log-spaced around the centre
    seeds: int = 3
    layers: int = 4
    dim: int = 128
    heads: int = 4
    precision: str = "bf16-weights"  # the same on every CPU: a study resumes on another machine
    eval_batches: int = 16
    device: str = "cpu"

    # what a finished run must share with this study to be reused
    RUN_KEYS = ("budget", "base_batch", "context", "layers", "dim", "heads", "precision", "eval_batches", "device")


QUICK = dict(budget=8192, base_batch=2, multipliers=(1, 4), lr_factors=(0.5, 2.0), seeds=2, layers=1, dim=32,
             heads=2, eval_batches=2)


LEAN_MOMENTS = ("fp32", "bf16", "8bit", "4bit")
LEAN_MASTERS = ("fp32", "kahan", "none")


def optimizer_setting(name: str) -> Tuple[str, str, str]:
    """``(optimizer, moments, master_weights)`` of a study optimizer name: ``lamb``, ``adamw``, or
    ``lamb-<moments>-<master weights>`` (LAMB with lean state, e.g. ``lamb-8bit-kahan``; see
    ``python -m mplamb train --moments/--master-weights``)."""
    if name in ("lamb", "adamw"):
        return name, "fp32", "fp32"
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "lamb" and parts[1] in LEAN_MOMENTS and parts[2] in LEAN_MASTERS:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"optimizer {name!r}: expected 'lamb', 'adamw' or 'lamb-<{'|'.join(LEAN_MOMENTS)}>-"
                     f"<{'|'.join(LEAN_MASTERS)}>'")


def _lr(cfg: StudyConfig, optimizer: str, k: int, factor: float) -> float:
    base = dict(cfg.base_lr)
    centre = base.get(optimizer, base.get(optimizer_setting(optimizer)[0]))  # a lean LAMB: LAMB's centre
    return float(f"{centre * math.sqrt(k) * factor:.6g}")


def plan_sweep(cfg: StudyConfig) -> List[Dict[str, Any]]:
    """The sweep's runs, in order (every optimizer at every multiplier and learning rate, seed 0)."""
    return [{"optimizer": o, "multiplier": k, "lr": _lr(cfg, o, k, f), "seed": 0}
            for k in cfg.multipliers for o in cfg.optimizers for f in cfg.lr_factors]


def _key(run: Dict[str, Any]) -> Tuple:
    return (run["optimizer"], int(run["multiplier"]), float(run["lr"]), int(run["seed"]))


def _settings(cfg: StudyConfig, precision: str) -> Dict[str, Any]:
    s = {k: getattr(cfg, k) for k in StudyConfig.RUN_KEYS}
    s["precision"] = precision
    return s


def _load(path: pathlib.Path, settings: Dict[str, Any]) -> Dict[Tuple, Dict[str, Any]]:
    """Finished runs of ``runs.jsonl`` made with the same settings (a half-written last line is ignored)."""
    done: Dict[Tuple, Dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("settings") == settings:
            done[_key(rec)] = rec
    return done


def _train_one(cfg: StudyConfig, run: Dict[str, Any], corpus: Any, precision: str) -> Dict[str, Any]:
    from .train import TrainConfig, train

    batch = cfg.base_batch * run["multiplier"]
    steps = max(1, cfg.budget // (batch * cfg.context))
    optimizer, moments, master_weights = optimizer_setting(run["optimizer"])
    tc = TrainConfig(optimizer=optimizer, moments=moments, master_weights=master_weights, steps=steps, batch_size=batch, lr=run["lr"],
                     warmup=max(1, steps // 10), context=cfg.context, seed=run["seed"], layers=cfg.layers,
                     dim=cfg.dim, heads=cfg.heads, precision=precision, eval_every=max(1, steps // 4),
                     eval_batches=cfg.eval_batches, device=cfg.device)
    t0 = time.perf_counter()
    h = train(tc, corpus, progress=False, log=lambda msg: None)
    final = h["val_loss"][-1] if h["val_loss"] else float("nan")
    return {**run, "batch": batch, "steps": steps, "final_val_loss": final,
            "final_train_loss": h["train_loss"][-1], "skipped_steps": int(h.get("skipped_steps", 0)),
            "wall_s": time.perf_counter() - t0}


def best_lrs(cfg: StudyConfig, done: Dict[Tuple, Dict[str, Any]]) -> Dict[Tuple[str, int], float]:
    """Per (optimizer, multiplier): the sweep's learning rate with the lowest final validation loss (a
    diverged run, NaN, never wins)."""
    best: Dict[Tuple[str, int], Tuple[float, float]] = {}
    for run in plan_sweep(cfg):
        rec = done.get(_key(run))
        if rec is None:
            continue
        loss = rec["final_val_loss"]
        loss = math.inf if loss is None or math.isnan(loss) else loss
        k = (run["optimizer"], run["multiplier"])
        if k not in best or loss < best[k][0]:
            best[k] = (loss, run["lr"])
    return {k: v[1] for k, v in best.items()}


def run_study(cfg: StudyConfig, out: pathlib.Path, *, progress: Optional[Callable[[str, int, int], None]] = None,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) the whole study into ``out``; returns :func:`summarise`'s summary."""
    from .demo.data import load_corpus
    from .train import resolve_precision

    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(cfg.precision, cfg.device)
    settings = _settings(cfg, precision)
    path = out / "runs.jsonl"
    done = _load(path, settings)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a") as f:  # a line cut short by a kill: the next record starts on a line of its own
            f.write("\n")
    corpus = load_corpus(context=cfg.context)
    sweep = plan_sweep(cfg)
    total = len(sweep) + len(cfg.optimizers) * len(cfg.multipliers) * max(0, cfg.seeds - 1)
    finished = [0]

    def execute(run: Dict[str, Any]) -> None:
        if _key(run) not in done:
            label = f"{run['optimizer']} x{run['multiplier']} lr {run['lr']:.3g} seed {run['seed']}"
            if progress:
                progress(label, finished[0], total)
            rec = {**_train_one(cfg, run, corpus, precision), "settings": settings}
            with path.open("a") as f:  # appended at once: a killed study keeps every finished run
                f.write(json.dumps(rec) + "\n")
            done[_key(run)] = rec
            log(f"{label}: final val loss {rec['final_val_loss']:.4f} ({rec['wall_s']:.0f} s)")
        finished[0] += 1
        if progress:
            progress("", finished[0], total)

    for run in sweep:
        execute(run)
    for (opt, k), lr in sorted(best_lrs(cfg, done).items(), key=lambda e: (e[0][1], e[0][0])):
        for seed in range(1, cfg.seeds):
            execute({"optimizer": opt, "multiplier": k, "lr": lr, "seed": seed})
    summary = summarise(cfg, done, corpus.unigram_loss, precision)
    report(summary, out)
    return summary


def summarise(cfg: StudyConfig, done: Dict[Tuple, Dict[str, Any]], unigram: float, precision: str) -> Dict[str, Any]:
    """Per multiplier and optimizer: best lr, final validation losses over seeds, their mean and standard
    deviation; LAMB - AdamW and the verdict; and the sweep's loss against lr (sensitivity)."""
    best = best_lrs(cfg, done)
    rows = []
    for k in cfg.multipliers:
        row: Dict[str, Any] = {"multiplier": k, "batch": cfg.base_batch * k,
                               "steps": max(1, cfg.budget // (cfg.base_batch * k * cfg.context))}
        for opt in cfg.optimizers:
            lr = best.get((opt, k))
            losses = [done[key]["final_val_loss"] for s in range(cfg.seeds)
                      if lr is not None and (key := (opt, k, lr, s)) in done]
            grid = [_lr(cfg, opt, k, f) for f in cfg.lr_factors]
            row[opt] = {"lr": lr, "losses": losses, "edge": lr is not None and len(grid) > 2 and lr in (min(grid), max(grid)),
                        "mean": statistics.mean(losses) if losses else None,
                        "std": statistics.stdev(losses) if len(losses) > 1 else 0.0}
        a, b = (list(cfg.optimizers) + [None, None])[:2]  # the first two optimizers are compared
        if b is not None and row[a]["mean"] is not None and row[b]["mean"] is not None:
            diff = row[a]["mean"] - row[b]["mean"]
            spread = max(row[a]["std"], row[b]["std"])
            row["difference"] = diff
            if (a, b) == ("lamb", "adamw"):
                row["lamb_minus_adamw"] = diff
            row["verdict"] = "tie" if abs(diff) <= 2 * spread or spread == 0 and diff == 0 else (
                f"{_title(a)} wins" if diff < 0 else f"{_title(b)} wins")
            if spread == 0:
                row["verdict"] += " (one seed)"
        rows.append(row)
    sensitivity = [{"optimizer": run["optimizer"], "multiplier": run["multiplier"], "lr": run["lr"],
                    "final_val_loss": done[_key(run)]["final_val_loss"]}
                   for run in plan_sweep(cfg) if _key(run) in done]
    return {"config": {k: v for k, v in dataclasses.asdict(cfg).items()}, "precision": precision,
            "unigram": unigram, "rows": rows, "sensitivity": sensitivity}


def _title(name: str) -> str:
    """An optimizer's name in the study's tables: LAMB, AdamW, or LAMB-8bit-kahan."""
    return {"lamb": "LAMB", "adamw": "AdamW"}.get(name, name.replace("lamb", "LAMB", 1))


def _table(summary: Dict[str, Any]) -> str:
    cfg = summary["config"]
    a, b = (list(cfg["optimizers"]) + [None, None])[:2]
    ta, tb = _title(a), _title(b) if b else "-"
    lines = [f"Fixed budget {cfg['budget']:,} tokens per run, context {cfg['context']}, base batch "
             f"{cfg['base_batch']}, model {cfg['layers']} layers x {cfg['dim']}, precision {summary['precision']}; "
             f"best of {len(cfg['lr_factors'])} learning rates per optimizer and batch, then {cfg['seeds']} seeds; "
             f"unigram baseline {summary['unigram']:.3f} nats/byte.", "",
             f"| batch (multiplier) | steps | {ta} best lr | {ta} val loss | {tb} best lr | {tb} val loss "
             f"| {ta} - {tb} | verdict |", "|---|---|---|---|---|---|---|---|"]

    def cell(r: Dict[str, Any]) -> str:
        return "-" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f} (n={len(r['losses'])})"

    def lr(r: Optional[Dict[str, Any]]) -> str:
        return "-" if not r or r["lr"] is None else f"{r['lr']:g}" + (" (grid edge)" if r.get("edge") else "")

    for row in summary["rows"]:
        lamb, adamw = row.get(a), row.get(b) if b else None
        lines.append(f"| {row['batch']} ({row['multiplier']}x) | {row['steps']} | "
                     f"{lr(lamb)} | {cell(lamb) if lamb else '-'} | "
                     f"{lr(adamw)} | {cell(adamw) if adamw else '-'} | "
                     f"{row.get('difference', float('nan')):+.4f} | {row.get('verdict', '-')} |")
    return "\n".join(lines)


def report(summary: Dict[str, Any], out: pathlib.Path) -> None:
    """``study.md``, ``study.json`` and the two plots (loss against batch size with error bars; loss
    against learning rate per batch size)."""
    table = _table(summary)
    (out / "study.md").write_text(table + "\n")
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lamb": "tab:red", "adamw": "tab:blue"}
    cfg = summary["config"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for opt in cfg["optimizers"]:
        pts = [(r["batch"], r[opt]["mean"], r[opt]["std"]) for r in summary["rows"] if r[opt]["mean"] is not None]
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, color=colors.get(opt), label=f"{opt} (best lr)")
    ax.axhline(summary["unigram"], color="gray", linestyle="--", label="unigram baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences; same tokens: fewer, larger steps)")
    ax.set_ylabel("final validation loss (nats / byte)")
    ax.set_title("Fixed token budget, tuned lr: mean ± std over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "study_loss.png", dpi=110)
    plt.close(fig)
    mults = list(cfg["multipliers"])
    fig, axes = plt.subplots(1, len(mults), figsize=(3.2 * len(mults), 3.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], mults):
        for opt in cfg["optimizers"]:
            pts = sorted((s["lr"], s["final_val_loss"]) for s in summary["sensitivity"]
                         if s["optimizer"] == opt and s["multiplier"] == k)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors.get(opt), label=opt)
        ax.set_xscale("log")
        ax.set_title(f"batch x{k}")
        ax.set_xlabel("peak lr")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (seed 0)")
    axes[0][0].legend()
    fig.suptitle("Learning-rate sensitivity")
    fig.tight_layout()
    fig.savefig(out / "study_sensitivity.png", dpi=110)
    plt.close(fig)
