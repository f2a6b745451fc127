"""Question 5: does bf16 autocast speed the MAE levels up here, and how far do hypergradients
move from float32?

The engine already takes ``trainer.precision: fp32 | bf16 | fp16`` as ``autocast_dtype``: every
loss evaluation (steps, finite differences, Hessian-vector products) runs under
``torch.autocast``; parameters, optimizer states and the hypergradient algebra stay float32.

bf16 runs attention unfused: the CPU flash kernel is about 3x slower under bf16 than unfused
attention here, while float32 finite-difference darts keeps it fused (its fastest setting).

Agreement: from one state, the masker hypergradient under bf16 against float32 (relative
difference and cosine), for darts (finite differences), darts with the exact head edge, darts exact on both edges
(the ε → 0 limit, double backward through the MAE too) and cg;
beside them, the plain pretraining gradient under bf16 against float32, which is the floor of
what bf16 can be expected to keep.
Timing: plain pretraining steps and MLO-MAE cycles, float32 and bf16 interleaved.

    .venv/bin/python benchmarks/precision.py [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
import mae_graph as G
from mlomae.models.masking import random_masking

BF16 = torch.bfloat16
# name: (method, options, head-edge options); attention as the builder chooses it
# (mlomae.build.choose_attention: unfused under bf16 on the CPU and for second-order pushes)
VARIANTS = {"darts": ("darts", {}, None), "darts_exact_head": ("darts", {}, {"exact": True}),
            "darts_exact": ("darts", {"exact": True}, None), "cg": ("cg", {"iters": 5}, None)}


def cosine(a, b) -> float:
    fa = torch.cat([t.double().flatten() for t in a])
    fb = torch.cat([t.double().flatten() for t in b])
    return float(F.cosine_similarity(fa, fb, dim=0))


def hypergradient(name, sizes, state, batches, autocast):
    method, opts, head = VARIANTS[name]
    eng = G.build_mlomae(method, sizes, state, batches, options=opts, head_edge=head,
                         autocast=autocast)   # the builder's attention choice
    torch.manual_seed(0)
    eng.prefix("mask")
    return eng.gradient("mask")[2]


def plain_gradient(sizes, state, batches, autocast):
    model = G.modules(sizes, state)[0]
    G.set_fused_attention(model, autocast is None)
    imgs = batches["pretrain"][0][0]
    torch.manual_seed(0)
    masking = random_masking(imgs.shape[0], sizes.patches, sizes.ratio)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(imgs, masking)[0]
    return torch.autograd.grad(loss, list(model.parameters()))


def main() -> None:
    args = common.parser(__doc__, repeats=6, quick_repeats=2).parse_args()
    repeats = common.setup(args)
    sizes = G.Sizes()
    state, batches = G.initial_state(sizes), G.data(sizes)
    variants = list(VARIANTS) if not args.quick else ["darts_exact"]
    print(f"precision: bf16 autocast vs float32; threads {args.threads}, {repeats} timed each")

    agree = {}
    g32, g16 = plain_gradient(sizes, state, batches, None), plain_gradient(sizes, state, batches, BF16)
    agree["plain pretraining gradient"] = (common.rel(g16, g32), cosine(g16, g32))
    for v in variants:
        h32 = hypergradient(v, sizes, state, batches, None)
        h16 = hypergradient(v, sizes, state, batches, BF16)
        agree[f"{v} masker hypergradient"] = (common.rel(h16, h32), cosine(h16, h32))
    print(common.table([[k, r, c] for k, (r, c) in agree.items()],
                       ["bf16 vs float32", "rel. diff", "cosine"]))

    contenders = {"plain fp32": G.PlainStep(sizes, state, batches["pretrain"]),
                  "plain bf16": G.PlainStep(sizes, state, batches["pretrain"], autocast=BF16,
                                            fused=False)}
    for v in variants:
        method, opts, head = VARIANTS[v]
        for tag, ac in (("fp32", None), ("bf16", BF16)):
            contenders[f"{v} {tag}"] = G.build_mlomae(
                method, sizes, state, batches, options=opts, head_edge=head, autocast=ac).step
    times = common.interleave(contenders, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    rows = []
    for base in ["plain"] + variants:
        rows.append([base, 1e3 * med[f"{base} fp32"], 1e3 * med[f"{base} bf16"],
                     med[f"{base} bf16"] / med[f"{base} fp32"]])
    print(common.table(rows, ["step", "fp32 ms", "bf16 ms", "bf16 / fp32"]))
    key = "darts_exact"
    print(f"HEADLINE 5: bf16 / fp32 time: plain step {med['plain bf16'] / med['plain fp32']:.2f}x, "
          f"MLO-MAE cycle ({key}) {med[key + ' bf16'] / med[key + ' fp32']:.2f}x; masker "
          f"hypergradient rel. diff {agree[key + ' masker hypergradient'][0]:.2f} "
          f"(plain gradient {agree['plain pretraining gradient'][0]:.2f})")
    common.save("precision", {"agreement_rel_cos": agree, "median_s": med, "times_s": times}, args)


if __name__ == "__main__":
    main()
