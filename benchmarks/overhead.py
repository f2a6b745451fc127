"""Question 1: engine overhead. Single-level training through ``Engine.step`` against a
hand-written PyTorch loop: same model, batch, optimizer and data in memory.

  mae   the Fashion-MNIST MAE (embed 128, depth 4, batch 128, random masks, AdamW): goal <= 1.03x
  mlp   the 101k-parameter MLP of question 3a (batch 256, SGD): a step of a few milliseconds,
        where the engine's fixed cost per step (batch, RNG capture, gradient norm and finiteness
        check, StepRecord) shows; reported in microseconds per step

Both contenders first take one step from the same state and seed; their parameters must agree.

    .venv/bin/python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
import mae_graph as G
from mlomae.engine import Engine, Problem


class MLPLoss(Problem):
    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y)


def mlp_contenders(seed: int = 0):
    from peers_mlp import Repeat, mlp, task
    (x, y), _, state, _ = task(seed)
    hand, eng_net = mlp(), mlp()
    hand.load_state_dict(state)
    eng_net.load_state_dict(state)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)

    def hand_step():
        loss = F.cross_entropy(hand(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    engine = Engine([MLPLoss("mlp", eng_net, optimizer=torch.optim.SGD(eng_net.parameters(), lr=0.1),
                             data=Repeat((x, y)))])
    return hand_step, engine.step, hand, eng_net


def mae_contenders(sizes: G.Sizes):
    state, batches = G.initial_state(sizes), G.data(sizes)
    hand = G.PlainStep(sizes, state, batches["pretrain"])
    engine = G.single_level(sizes, state, batches["pretrain"])
    return hand, engine.step, hand.model, engine.problems["pretrain"].module


def measure(name: str, hand, engine, hand_mod, eng_mod, repeats: int) -> dict:
    torch.manual_seed(123)
    hand()
    torch.manual_seed(123)
    engine()
    agree = common.rel(list(eng_mod.parameters()), list(hand_mod.parameters()))
    times = common.interleave({"hand": hand, "engine": engine}, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    # paired ratio per round: robust to load drifting during the run
    paired = common.median([e / h for e, h in zip(times["engine"], times["hand"])])
    return {"median_s": med, "ratio": med["engine"] / med["hand"], "paired_ratio": paired,
            "overhead_us_per_step": 1e6 * (med["engine"] - med["hand"]),
            "params_rel_diff_after_one_step": agree, "times_s": times}


def main() -> None:
    args = common.parser(__doc__, repeats=30, quick_repeats=8).parse_args()
    repeats = common.setup(args)
    print(f"overhead: threads {args.threads}, {repeats} interleaved steps (mae), "
          f"{20 * repeats} (mlp)")
    res = {"mae": measure("mae", *mae_contenders(G.Sizes()), repeats),
           "mlp": measure("mlp", *mlp_contenders(), 20 * repeats)}
    rows = [[k, 1e3 * r["median_s"]["hand"], 1e3 * r["median_s"]["engine"], r["ratio"],
             r["paired_ratio"], r["overhead_us_per_step"], r["params_rel_diff_after_one_step"]]
            for k, r in res.items()]
    print(common.table(rows, ["model", "hand ms", "engine ms", "engine / hand",
                              "paired ratio (median)", "overhead µs / step",
                              "param rel. diff after 1 step"]))
    print(f"HEADLINE 1: engine / hand-written loop (MAE pretraining) = {res['mae']['ratio']:.3f}x "
          f"(goal <= 1.03); MLP step overhead {res['mlp']['overhead_us_per_step']:.0f} µs")
    common.save("overhead", res, args)


if __name__ == "__main__":
    main()
