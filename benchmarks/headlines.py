"""Print the headline ratios of every question from benchmarks/results/, with each goal's status.

    .venv/bin/python benchmarks/headlines.py [--quick]
"""

from __future__ import annotations

import argparse
import json

import common


def load(name: str, quick: bool) -> dict | None:
    """The results of ``name``; with ``quick``, those of make bench-quick when there are any,
    else the committed full run's, marked ``from_full`` so the table says so."""
    for suffix in (("-quick", "") if quick else ("",)):
        path = common.RESULTS / f"{name}{suffix}.json"
        if path.exists():
            r = json.loads(path.read_text())
            r["from_full"] = quick and suffix == ""
            return r
    return None


def tag(r: dict) -> str:
    return f" [full run {r['machine']['date']}]" if r.get("from_full") else ""


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="prefer results of make bench-quick")
    quick = p.parse_args().quick
    lines = []
    r = load("overhead", quick)
    if r:
        x = r["mae"]["ratio"]
        lines.append(("1 engine / hand-written MAE pretraining step", f"{x:.3f}x", "<= 1.03",
                      verdict(x <= 1.03)))
        lines.append(("1 engine overhead per step, 101k MLP", f"{r['mlp']['overhead_us_per_step']:.0f} µs",
                      "", ""))
    r = load("mae_methods", quick)
    if r and "darts" in r["methods"]:
        x = r["methods"]["darts"]["per_pretrain_step"]
        lines.append(("2 darts, plain steps per pretraining step" + tag(r), f"{x:.2f}", "<= 3.5",
                      verdict(x <= 3.5)))
        if "darts_exact_head" in r["methods"]:
            x = r["methods"]["darts_exact_head"]["per_pretrain_step"]
            lines.append(("2 darts (exact head edge), plain steps per pretraining step" + tag(r),
                          f"{x:.2f}", "<= 3.5", verdict(x <= 3.5)))
    elif load("peers_mae", quick):  # make bench-quick: question 3b's cycles, official wiring
        r = load("peers_mae", quick)
        for k, label in (("mlomae", "darts"), ("mlomae_exact_head", "darts, exact head edge")):
            x = r["cost_per_pretrain_step"][k]
            lines.append((f"2 {label}, plain steps per pretraining step (official wiring)",
                          f"{x:.2f}", "<= 3.5", verdict(x <= 3.5)))
    r = load("peers_mlp", quick)
    if r:
        for m, v in r["methods"].items():
            x = v["ratio_vs_fastest_right_peer"]
            if x is None:
                lines.append((f"3a {m}: no peer agreed to 1e-4", "", "<= 1.0", "n/a"))
                continue
            lines.append((f"3a {m}: mlomae / fastest agreeing peer ({v['fastest_right_peer']})",
                          f"{x:.2f}x", "<= 1.0", verdict(x <= 1.0)))
        cf = r["cg_closed_form_rel_err"]
        if cf.get("betty") is not None:
            lines.append(("3a Betty's released CG vs closed form (rel. error)", f"{cf['betty']:.2f}",
                          "", f"mlomae {cf['mlomae']:.0e}"))
    r = load("peers_mae", quick)
    if r:
        for k, label in (("mlomae", "FD both edges"), ("mlomae_exact_head", "exact head edge")):
            x = r["ratio_vs_betty"][k]
            lines.append((f"3b mlomae / Betty per MLO-MAE cycle ({label})", f"{x:.2f}x", "<= 0.8",
                          verdict(x <= 0.8)))
            y = r["cost_per_pretrain_step"][k]
            lines.append((f"3b cost per pretraining step ({label})", f"{y:.2f}",
                          "<= 4.2 (stretch 3.5)", verdict(y <= 4.2)))
        lines.append(("3b Betty cost per pretraining step (DESIGN: 5.3)",
                      f"{r['cost_per_pretrain_step']['betty']:.2f}", "", ""))
    r = load("memory", quick)
    if r:
        ks = [str(k) for k in r["ks"]]
        lo, hi = ks[0], ks[-1]
        m = r["mlp_peak_bytes"]
        lines.append((f"4 unroll peak memory K={hi} / K={lo}", f"{m['unroll'][hi] / m['unroll'][lo]:.2f}x",
                      "grows", ""))
        for meth in ("neumann", "cg"):
            vals = [m[meth][k] for k in ks]
            x = max(vals) / min(vals)
            lines.append((f"4 {meth} peak memory max / min over K={','.join(ks)}", f"{x:.2f}x",
                          "<= 1.10", verdict(x <= 1.10)))
    r = load("precision", quick)
    if r:
        med = r["median_s"]
        for base in ("plain", "darts_exact", "darts_exact_head"):
            if f"{base} bf16" in med:
                lines.append((f"5 bf16 / fp32 time, {base}", f"{med[base + ' bf16'] / med[base + ' fp32']:.2f}x",
                              "", ""))
        for k, (rel, cos) in r["agreement_rel_cos"].items():
            lines.append((f"5 bf16 vs fp32, {k}", f"rel {rel:.3f}", "", f"cosine {cos:.3f}"))
    if not lines:
        print("no results yet: run make bench-quick or make bench")
        return
    print(common.table(lines, ["headline", "value", "goal", "status"]))


if __name__ == "__main__":
    main()
