"""The LAMB paper's central claim, scaled down: at a fixed token budget, grow the batch and compare
LAMB with AdamW.

For each batch multiplier k in --multipliers (default 1, 4, 16): batch = k * base batch, steps =
budget / (batch * context), learning rate = base lr * sqrt(k), linear warm-up over 10% of the steps
then cosine decay (mplamb.train's schedule), max_grad_norm 1.0.  LAMB trains bf16 weights with fp32
masters (mplamb.Lamb), AdamW fp32 weights (torch.optim.AdamW).  Reports the final validation loss
per (optimizer, multiplier, seed), a Markdown table and a PNG plot.

    python benchmarks/large_batch.py --out mplamb-report-large-batch
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

from mplamb.demo.data import load_corpus
from mplamb.train import TrainConfig, resolve_precision, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=655_360, help="training tokens per run")
    p.add_argument("--base-batch", type=int, default=8, help="sequences per step at multiplier 1")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--multipliers", default="1,4,16")
    p.add_argument("--lamb-lr", type=float, default=0.015, help="LAMB peak lr at multiplier 1")
    p.add_argument("--adamw-lr", type=float, default=1.5e-3, help="AdamW peak lr at multiplier 1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default="mplamb-report-large-batch")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(context=args.context)
    precision = resolve_precision("auto", "cpu")
    mults = [int(m) for m in args.multipliers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        for k in mults:
            batch = args.base_batch * k
            steps = max(1, args.budget // (batch * args.context))
            for opt, lr0 in (("lamb", args.lamb_lr), ("adamw", args.adamw_lr)):
                cfg = TrainConfig(optimizer=opt, steps=steps, batch_size=batch, lr=lr0 * math.sqrt(k),
                                  warmup=max(1, steps // 10), context=args.context, seed=seed, precision=precision,
                                  eval_every=max(1, steps // 4), eval_batches=16)
                t0 = time.perf_counter()
                h = train(cfg, corpus, progress=False)
                results.append({"optimizer": opt, "multiplier": k, "batch": batch, "steps": steps,
                                "lr": cfg.lr, "seed": seed, "final_val_loss": h["val_loss"][-1],
                                "val_steps": h["val_steps"], "val_loss": h["val_loss"],
                                "wall_s": time.perf_counter() - t0})
                print(f"seed {seed} x{k:<3} batch {batch:<4} steps {steps:<4} {opt:<6} lr {cfg.lr:.4g}: "
                      f"final val loss {h['val_loss'][-1]:.3f}", flush=True)
    lines = [f"Fixed budget {args.budget:,} tokens, context {args.context}, base batch {args.base_batch}, "
             f"lr x sqrt(k), warm-up 10%, seeds {args.seeds}, precision {precision}; unigram baseline "
             f"{corpus.unigram_loss:.3f}.", "",
             "| batch multiplier | batch | steps | LAMB lr | LAMB val loss | AdamW lr | AdamW val loss | LAMB - AdamW |",
             "|---|---|---|---|---|---|---|---|"]
    for k in mults:
        rows = {o: [r for r in results if r["optimizer"] == o and r["multiplier"] == k] for o in ("lamb", "adamw")}
        lv = statistics.mean(r["final_val_loss"] for r in rows["lamb"])
        av = statistics.mean(r["final_val_loss"] for r in rows["adamw"])
        lines.append(f"| {k}x | {rows['lamb'][0]['batch']} | {rows['lamb'][0]['steps']} | {rows['lamb'][0]['lr']:.4g} "
                     f"| {lv:.3f} | {rows['adamw'][0]['lr']:.4g} | {av:.3f} | {lv - av:+.3f} |")
    table = "\n".join(lines)
    (out / "large_batch.md").write_text(table + "\n")
    (out / "large_batch.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for opt, color in (("lamb", "tab:red"), ("adamw", "tab:blue")):
            ys = [statistics.mean(r["final_val_loss"] for r in results if r["optimizer"] == opt and r["multiplier"] == k)
                  for k in mults]
            ax.plot(mults, ys, marker="o", color=color, label=opt)
        ax.axhline(corpus.unigram_loss, color="gray", linestyle="--", label="unigram baseline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(mults, [f"{k}x" for k in mults])
        ax.set_xlabel("batch size multiplier (same tokens: fewer, larger steps)")
        ax.set_ylabel("final validation loss (nats / byte)")
        ax.set_title("Fixed token budget: LAMB vs AdamW as the batch grows")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "large_batch.png", dpi=110)
    except ImportError:
        pass
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
