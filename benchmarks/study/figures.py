"""The study's figures (``run_study.py`` draws them after every report): accuracy per method and
the masks' heat maps side by side."""

from __future__ import annotations

import statistics
from pathlib import Path

import records


def draw(study: dict, results: Path, out_dir: Path) -> list[Path]:
    """Into ``out_dir``: accuracy per method of ``study`` (mean and std over the seeds whose
    records lie in ``results``) and the mask heat maps of each method's first finished seed side
    by side. Returns the files written (none before any evaluation has finished)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = records.collect(results)
    methods = [m for m in study["methods"] if rows.get(m)]
    metrics = study["report_metrics"]
    if not methods or not any(k in r.get("eval", {}) for m in methods for r in rows[m] for k in metrics):
        return []
    fig, ax = plt.subplots(figsize=(max(10.0, 1.4 * len(methods)), 4.6))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics.items()):
        means, stds = [], []
        for m in methods:
            xs = [r["eval"][key] for r in rows[m] if key in r.get("eval", {})]
            means.append(statistics.mean(xs) if xs else 0.0)
            stds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ax.bar([i + j * width for i in range(len(methods))], means, width, yerr=stds,
               label=label, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))])
    ax.set_xticklabels([f"{m}\n({len(rows[m])} seed{'s' * (len(rows[m]) > 1)})" for m in methods],
                       rotation=20, ha="right", fontsize=8)
    lo = min(r["eval"][k] for m in methods for r in rows[m] for k in metrics if k in r.get("eval", {}))
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_ylabel("top-1 on test (%)")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"Fashion-MNIST, {study['pretrain_steps']} pretraining steps per method")
    fig.tight_layout()
    paths = [out_dir / "accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    heat = [(m, sorted(results.glob(f"{m}-s*-heatmap.png"))) for m in methods]
    heat = [(m, ps[0]) for m, ps in heat if ps]
    if heat:
        cols = min(5, len(heat))
        rows_ = -(-len(heat) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.4 * rows_), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (m, png) in zip(axes.flat, heat):
            ax.imshow(plt.imread(png))
            ax.set_title(f"{m}\n({png.name.removesuffix('-heatmap.png')})", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / "mask_heatmaps.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
