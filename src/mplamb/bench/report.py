"""Tables and charts of a benchmark result (:func:`mplamb.bench.runner.run`)."""
from __future__ import annotations

import statistics
from typing import Dict, List, Tuple

FAST = {"cpu": "mplamb Lamb [fused_cpu]", "cuda": "mplamb Lamb [triton]"}  # the backend "auto" picks


def _fast(result: dict) -> str:
    return FAST[result.get("device", "cpu")]


def late_name(name: str, step: int) -> str:
    """The row (or column label) of ``name`` timed with its step counts starting at ``step``."""
    return f"{name} from t={step}"


def ratio(row: dict, ref: dict) -> float:
    """How many times slower ``row`` is than ``ref``: the median of the per-round ratios when both were
    timed round-robin in one process (each round times every candidate back to back, so a drift of
    the machine's speed between rounds cancels), else the ratio of the medians (own-process peers)."""
    paired = row.get("interleaved", True) and ref.get("interleaved", True) and len(row["times"]) == len(ref["times"])
    if paired and row["times"]:
        return statistics.median(a / b for a, b in zip(row["times"], ref["times"]))
    return row["median_s"] / ref["median_s"]


def _groups(result: dict) -> Dict[Tuple[str, str], List[dict]]:
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["setup"]), []).append(r)
    return groups


def table(result: dict) -> str:
    """A Markdown table per (workload, setup) with medians, spread, roof fraction and ratios."""
    fast = _fast(result)
    gpu = f" on {result['machine']['gpu']}" if "gpu" in result["machine"] else ""
    lines = [f"Roofs measured in the same run{gpu}: STREAM triad {result['triad_gb_per_s']:.1f} GB/s, "
             f"in-place pass {result['inplace_gb_per_s']:.1f} GB/s, copy {result['copy_gb_per_s']:.1f} GB/s "
             f"(bytes read + written; {result['repeats']} round-robin repeats, medians).  Fractions are of the "
             f"{result['roof']} roof.  \"Faster by\" is the median of the per-round ratios (the ratio of the "
             "medians for peers timed in a process of their own).", ""]
    for (wl, setup), rows in _groups(result).items():
        ours = next((r for r in rows if r["name"] == fast), None)
        refs = [(ours, fast.split()[-1])]  # (row the ratios are taken against, its column label)
        late = result.get("late_step")
        ours_late = next((r for r in rows if r["name"] == late_name(fast, late)), None) if late else None
        if ours_late:
            refs.append((ours_late, late_name(fast.split()[-1], late)))
        n, nt = rows[0]["params"], rows[0]["tensors"]
        lines += [f"**{wl}** ({nt} tensors, {n / 1e6:.1f}M params), setup **{setup}** "
                  f"(mplamb params {setup}{' + fp32 masters' if setup != 'fp32' else ''}; peers fp32)", "",
                  f"| optimizer | params | s/step (median) | p25-p75 | ns/param | fraction of {result['roof']} roof | "
                  + "".join(f"{label} is faster by | " for _, label in refs) + "peak extra MB | warm-up s |",
                  "|---|---|---|---|---|---|" + "---|" * len(refs) + "---|---|"]
        for r in sorted(rows, key=lambda r: r["median_s"]):
            frac = f"{r['fraction_of_roof']:.2f}" if "fraction_of_roof" in r else "-"
            ratios = "".join((f"{ratio(r, ref):.2f}x" if ref and r is not ref else "-") + " | " for ref, _ in refs)
            mem = f"{r['peak_extra_mb']:.0f}" if r.get("peak_extra_mb") is not None else "-"
            lines.append(f"| {r['name']} | {r['param_dtype']} | {r['median_s']:.4f} | {r['p25_s']:.4f}-{r['p75_s']:.4f}"
                         f" | {r['ns_per_param']:.2f} | {frac} | {ratios}{mem} | {r['warmup_s']:.2f} |")
        if ours and nt >= 1000:
            bytes_s = ours["bytes_per_param"] * n / (result["roof_gb_per_s"] * 1e9)
            per_tensor = (ours["median_s"] - bytes_s) / nt * 1e6
            lines.append(f"\nPer-tensor overhead of {fast}: {per_tensor:.2f} us/tensor "
                         f"(step time minus its bytes at the {result['roof']} roof, divided by the number of "
                         "tensors).")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    """A PNG bar chart of step time per optimizer, one panel per (workload, setup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.6 * len(groups) + 0.6), squeeze=False)
    for ax, ((wl, setup), rows) in zip(axes[:, 0], groups.items()):
        rows = sorted(rows, key=lambda r: -r["median_s"])
        names = [r["name"] for r in rows]
        med = [r["median_s"] * 1e3 for r in rows]
        err = [[(r["median_s"] - r["p25_s"]) * 1e3 for r in rows], [(r["p75_s"] - r["median_s"]) * 1e3 for r in rows]]
        colors = ["tab:red" if n.startswith("mplamb") else "tab:gray" for n in names]
        ax.barh(names, med, xerr=err, color=colors)
        n = rows[0]["params"]
        roof_ms = 40 * n / (result["roof_gb_per_s"] * 1e9) * 1e3
        ax.axvline(roof_ms, color="tab:blue", linestyle="--",
                   label=f"40 B/param at the {result['roof']} roof ({roof_ms:.3g} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (median, p25-p75), log scale")
        ax.set_title(f"{wl}, {setup}")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
