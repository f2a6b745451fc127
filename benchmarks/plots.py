"""One PNG per question from benchmarks/results/*.json, into benchmarks/plots/.

    .venv/bin/python benchmarks/plots.py
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402

OUT = common.ROOT / "plots"
MIB = 2.0 ** 20


def load(name):
    path = common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def stamp(fig, r):
    m = r["machine"]
    fig.text(0.99, 0.01, f"{m['date']} · {m['cpu']} · {m['threads']} thread(s) · torch {m['torch']}",
             ha="right", va="bottom", fontsize=6, color="gray")


def q1(r):
    fig, ax = plt.subplots(figsize=(6, 3))
    names = ["MAE (Fashion-MNIST size)", "MLP 101k"]
    ratios = [r["mae"]["ratio"], r["mlp"]["ratio"]]
    ax.barh(names, ratios, color=["tab:blue", "tab:gray"])
    ax.axvline(1.03, color="red", ls="--", lw=1, label="goal 1.03 (MAE)")
    ax.axvline(1.0, color="black", lw=0.5)
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.3f}x", va="center", fontsize=8)
    ax.set_xlabel("engine step / hand-written step (median)")
    ax.set_xlim(0.9, max(ratios) * 1.1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Q1 engine overhead")
    return fig


def q2(r):
    ms = list(r["methods"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(ms)
    for phase, color in (("lower", "tab:blue"), ("hypergradient", "tab:orange"), ("upper", "tab:green")):
        vals = [r["methods"][m]["phases_plain_steps"][phase] for m in ms]
        ax.bar(ms, vals, bottom=bottom, color=color, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(7.0, color="red", ls="--", lw=1, label="goal: 3.5 per pretraining step (7 per cycle)")
    ax.set_ylabel("plain pretraining steps per cycle")
    ax.set_title("Q2 one MLO-MAE cycle (2 pretrain + finetune + mask) by phase")
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    return fig


def q3(ra, rb):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    colors = {"mlomae": "tab:blue", "higher": "tab:olive", "torchopt": "tab:purple", "betty": "tab:red"}
    x = 0
    ticks, labels = [], []
    for m, v in ra["methods"].items():
        for lib, sec in v["median_s"].items():
            wrong = v["rel_diff_vs_mlomae"][lib] > 1e-4
            ax.bar(x, 1e3 * sec, color=colors[lib], hatch="//" if wrong else None,
                   edgecolor="white" if wrong else None)
            ticks.append(x)
            labels.append(f"{lib}\n{m}")
            x += 1
        x += 0.7
    ax.set_xticks(ticks, labels, fontsize=6)
    ax.set_ylabel("ms per outer step (median)")
    ax.set_title("Q3a MLP 101k, per-sample weights, 5 inner steps (hatched: disagrees)", fontsize=9)
    if rb:
        ax = axes[1]
        names = ["mlomae", "mlomae_exact_head", "betty"]
        vals = [rb["cost_per_pretrain_step"][n] for n in names]
        ax.bar(["mlomae\n(FD)", "mlomae\n(exact head)", "Betty"], vals,
               color=["tab:blue", "tab:cyan", "tab:red"])
        ax.axhline(3.5, color="red", ls="--", lw=1, label="stretch 3.5")
        ax.axhline(0.8 * vals[-1], color="orange", ls=":", lw=1, label="0.8x Betty")
        ax.set_ylabel("plain steps per pretraining step")
        ax.set_title("Q3b MLO-MAE graph, darts", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def q4(r):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ks = [str(k) for k in r["ks"]]
    for m, v in r["mlp_peak_bytes"].items():
        ax.plot([int(k) for k in ks], [v[k] / MIB for k in ks], marker="o", label=m)
    ax.set_xlabel("K (lower steps; iterations for neumann / cg)")
    ax.set_ylabel("peak MiB of one outer step")
    ax.set_title("Q4 MLP 101k: memory vs K", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    mae = r["mae_peak_bytes"]
    ax.bar(list(mae), [b / MIB for b in mae.values()], color="tab:blue")
    ax.set_ylabel("peak MiB of one cycle")
    ax.set_title("Q4 MLO-MAE graph (K=2 pretraining steps)", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, fontsize=7)
    return fig


def q5(r):
    med = r["median_s"]
    bases = [k[:-5] for k in med if k.endswith(" fp32")]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.38
    xs = range(len(bases))
    ax.bar([x - width / 2 for x in xs], [1e3 * med[b + " fp32"] for b in bases], width, label="fp32")
    ax.bar([x + width / 2 for x in xs], [1e3 * med[b + " bf16"] for b in bases], width, label="bf16 autocast")
    ax.set_xticks(list(xs), bases, fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_title("Q5 bf16 autocast: plain step and MLO-MAE cycles", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    OUT.mkdir(exist_ok=True)
    made = []
    for name, fn, inputs in (("q1_overhead", q1, ["overhead"]), ("q2_mae_methods", q2, ["mae_methods"]),
                             ("q3_peers", q3, ["peers_mlp", "peers_mae"]), ("q4_memory", q4, ["memory"]),
                             ("q5_precision", q5, ["precision"])):
        data = [load(i) for i in inputs]
        if data[0] is None:
            continue
        fig = fn(*data)
        stamp(fig, data[0])
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(OUT / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(name)
    print("plots: " + (", ".join(f"benchmarks/plots/{n}.png" for n in made) or "none (no results)"))


if __name__ == "__main__":
    main()
