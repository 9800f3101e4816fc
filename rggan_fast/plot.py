"""Figures of a run: FID (or proxy), keep ratios and cumulative training FLOPs against kimg.

    python -m rggan_fast.plot RUN_DIR        # writes RUN_DIR/metrics.png

Also called at the end of every training run (when matplotlib is installed).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

from .training.loop import read_jsonl


def split_by_samples(rows: List[Dict]) -> Tuple[int, List[Dict], List[Dict]]:
    """(sample count of the evaluations during training, their rows, rows measured with another count:
    a final evaluation with final_fid_samples). FIDs of different counts are not comparable, so the
    figure shows them as separate series."""
    during = [r for r in rows if not r.get("final")] or rows
    n = Counter(r["fid_samples"] for r in during).most_common(1)[0][0]
    return n, [r for r in rows if r["fid_samples"] == n], [r for r in rows if r["fid_samples"] != n]


def plot_run(run_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ValueError(f"{run_dir} has no metrics.jsonl rows yet")
    kimg = [r["kimg"] for r in rows]
    score = "fid" if rows[-1].get("fid") is not None else "proxy_fid"
    label = "FID" if score == "fid" else "proxy FID (NOT a FID)"
    n, regular, other = split_by_samples(rows)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["kimg"] for r in regular], [r.get(score) for r in regular], "o-", label=f"{n} samples")
    for m in sorted({r["fid_samples"] for r in other}):
        pts = [r for r in other if r["fid_samples"] == m]
        ax[0].plot([r["kimg"] for r in pts], [r.get(score) for r in pts], "*", markersize=12,
                   label=f"final evaluation, {m} samples")
    for r in rows:  # shade the intervals trained in dense mode
        if r["next_mode"] == "dense":
            ax[0].axvspan(r["kimg"], r["kimg"] + (kimg[1] - kimg[0] if len(kimg) > 1 else 1), color="orange", alpha=0.2)
    ax[0].set(xlabel="kimg (real images shown to D / 1000)",
              ylabel=f"{label} vs {rows[-1]['fid_ref_images']} images",
              title="score (orange: dense-mode intervals)")
    ax[0].legend()
    ax[1].plot(kimg, [r["keep_ratio_G"] for r in rows], "o-", label="G")
    ax[1].plot(kimg, [r["keep_ratio_D"] for r in rows], "s-", label="D")
    ax[1].set(xlabel="kimg", ylabel="keep ratio (active / all weights)", title="sparsity")
    ax[1].legend()
    for k, style in (("flops_dense", "-"), ("flops_active", "--"), ("flops_executed", ":")):
        ax[2].plot(kimg, [r[k] for r in rows], style, label=k.split("_")[1])
    ax[2].set(xlabel="kimg", ylabel="cumulative training FLOPs (G + D)", title="compute")
    ax[2].legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "metrics.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m rggan_fast.plot RUN_DIR", file=sys.stderr)
        sys.exit(2)
    print(plot_run(sys.argv[1]))
