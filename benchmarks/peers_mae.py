"""Question 3b: the 3-level MLO-MAE graph on Betty 0.2.1 (its DARTS, the official wiring) against
mlomae's, at Fashion-MNIST size (embed 128, depth 4, 49 patches, batch 128), with one plain
random-mask pretraining step as the unit.

Cost per pretraining step = time of one cycle (2 pretrain + 1 fine-tune + 1 mask step) / 2, in
plain steps (DESIGN.md: Betty 5.3; goal at most 0.8x Betty, stretch 3.5).

Agreement first: both take one cycle from the same state on the same batches and the masker
gradients they apply are compared. Betty pushes the two adjoints that reach the MAE (through the
head, and directly) through the MAE one at a time, each with its own finite-difference step
ε = α/‖v‖; mlomae sums them and pushes once, so in float32 at α = 0.01 the two differ by the
finite-difference error; in float64 at α = 1e-5 both tend to the same mixed derivative.

    benchmarks/.venv-bench/bin/python benchmarks/peers_mae.py [--quick]
"""

from __future__ import annotations

import torch

import common
import mae_graph as G


def agreement(sizes: G.Sizes, alpha: float, dtype: torch.dtype, head_edge: dict | None = None,
              ) -> float:
    state = G.initial_state(sizes)
    if dtype != torch.float32:
        state = {k: {n: t.to(dtype) if t.is_floating_point() else t for n, t in v.items()}
                 for k, v in state.items()}
    batches = G.data(sizes, dtype=dtype)
    torch.set_default_dtype(dtype)
    try:
        ours = G.build_mlomae("darts", sizes, state, batches, options={"alpha": alpha},
                              head_edge=head_edge)
        box_ours = common.grad_capture(ours.problems["mask"].optimizer)
        betty = G.BettyGraph(sizes, state, batches, alpha=alpha)
        box_betty = common.grad_capture(betty.problems["mask"].optimizer)
        ours.step()
        betty.step()
    finally:
        torch.set_default_dtype(torch.float32)
    return common.rel(box_betty["grads"], box_ours["grads"])


def main() -> None:
    args = common.parser(__doc__, repeats=12, quick_repeats=4).parse_args()
    repeats = common.setup(args)
    sizes = G.Sizes()
    print(f"peers_mae: MAE embed {sizes.embed} depth {sizes.depth}, {sizes.patches} patches, "
          f"batch {sizes.batch}, masker hidden {sizes.masker_hidden}; threads {args.threads}, "
          f"{repeats} timed cycles each")
    rel32 = agreement(sizes, 0.01, torch.float32)
    rel64 = agreement(G.with_sizes(batch=16), 1e-5, torch.float64)
    print(f"  masker gradient, Betty vs mlomae: rel. diff {rel32:.1e} (float32, alpha 0.01), "
          f"{rel64:.1e} (float64, alpha 1e-5, batch 16)")

    rel64_exact = agreement(G.with_sizes(batch=16), 1e-5, torch.float64, {"exact": True})
    print(f"  masker gradient, Betty vs mlomae with the exact head edge: rel. diff "
          f"{rel64_exact:.1e} (float64, alpha 1e-5, batch 16)")

    state, batches = G.initial_state(sizes), G.data(sizes)
    contenders = {"plain": G.PlainStep(sizes, state, batches["pretrain"]),
                  "mlomae": G.build_mlomae("darts", sizes, state, batches).step,
                  "mlomae_exact_head": G.build_mlomae("darts", sizes, state, batches,
                                                      head_edge={"exact": True}).step,
                  "betty": G.BettyGraph(sizes, state, batches).step}
    times = common.interleave(contenders, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    names = ("mlomae", "mlomae_exact_head", "betty")
    per_pre = {k: med[k] / sizes.pretrain_steps / med["plain"] for k in names}
    ratio = {k: med[k] / med["betty"] for k in names}
    paired = {k: common.median([a / b for a, b in zip(times[k], times["betty"])]) for k in names}
    label = {"mlomae": "mlomae (darts, finite differences on both edges, as Betty)",
             "mlomae_exact_head": "mlomae (darts; head edge exact=True)",
             "betty": "Betty 0.2.1 (darts, official wiring)"}
    rows = [["plain random-mask pretraining step", 1e3 * med["plain"], 1.0, "", ""]]
    rows += [[label[k], 1e3 * med[k], per_pre[k], ratio[k], paired[k]] for k in names]
    print(common.table(rows, ["contender (one cycle)", "ms (median)",
                              "plain steps / pretraining step", "× Betty", "paired × Betty"]))
    best = min(("mlomae", "mlomae_exact_head"), key=med.get)
    print(f"HEADLINE 3b: mlomae / Betty per MLO-MAE cycle = {ratio['mlomae']:.2f}x (FD on both "
          f"edges), {ratio['mlomae_exact_head']:.2f}x (exact head edge) (goal <= 0.8); cost per "
          f"pretraining step {per_pre[best]:.2f} plain steps (Betty {per_pre['betty']:.2f}; "
          f"DESIGN goal <= 4.2, stretch 3.5)")
    common.save("peers_mae", {"median_s": med, "times_s": times, "cost_per_pretrain_step": per_pre,
                              "ratio_vs_betty": ratio, "paired_ratio_vs_betty": paired,
                              "rel_diff_fp32_alpha0.01": rel32, "rel_diff_fp64_alpha1e-5": rel64,
                              "rel_diff_fp64_exact_head": rel64_exact, "sizes": sizes.__dict__},
                args)


if __name__ == "__main__":
    main()
