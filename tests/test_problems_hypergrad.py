"""The masker's hypergradient through MLO-MAE's three levels on a tiny MAE (float64).

References: explicit autograd through the same SGD steps written out by hand (for the engine's
``unroll``), the exact one-step unroll (for ``darts``), and finite differences of gradients
(for ``neumann`` and ``cg``, which differentiate twice through the ViT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mlomae.build import choose_attention
from mlomae.hypergrad import LowerLevel
from mlomae.hypergrad.cg import CG
from mlomae.hypergrad.darts import Darts
from mlomae.hypergrad.neumann import Neumann
from mlomae.models.attention import set_fused_attention
from mlomae.models.masking import prob_topk_masking
from test_problems_tiny import mlo_graph
from test_problems_tiny import one_thread  # noqa: F401  (an autouse fixture)


class Method(nn.Module):
    """Calls ``module.<name>`` so that ``functional_call`` can substitute its parameters."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.m, self.name = module, name

    def forward(self, *args):
        return getattr(self.m, self.name)(*args)


def call(module, params, name, *args):
    return functional_call(Method(module, name), {f"m.{k}": v for k, v in params.items()}, args)


def by_hand(mods, batches, K, lr_pre, lr_ft, detach):
    """dF/dT by autograd through K pretraining SGD steps, one head SGD step, then the
    validation cross-entropy: the three levels written out without the engine."""
    mae, masker, head = mods["mae"], mods["masker"], mods["head"]
    (xp, _), (xf, yf), (xm, ym) = batches
    T = {n: p.detach().clone().requires_grad_(True) for n, p in masker.named_parameters()}
    th = {n: p.detach().clone().requires_grad_(True) for n, p in mae.named_parameters()}
    for _ in range(K):
        emb = call(mae, th, "embed_patches", xp)
        probs = call(masker, T, "forward", emb.detach() if detach else emb)
        loss = call(mae, th, "forward", xp, prob_topk_masking(probs, 0.75))[0]
        g = torch.autograd.grad(loss, list(th.values()), create_graph=True)
        th = {n: t - lr_pre * gi for (n, t), gi in zip(th.items(), g)}
    c = {n: p.detach().clone().requires_grad_(True) for n, p in head.named_parameters()}
    ce = F.cross_entropy(functional_call(head, c, (call(mae, th, "features", xf, "mean"),)), yf)
    gc = torch.autograd.grad(ce, list(c.values()), create_graph=True)
    c = {n: t - lr_ft * gi for (n, t), gi in zip(c.items(), gc)}
    val = F.cross_entropy(functional_call(head, c, (call(mae, th, "features", xm, "mean"),)), ym)
    return torch.autograd.grad(val, list(T.values()))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("detach", [True, False])
def test_three_level_unroll_equals_autograd_by_hand(detach):
    """Masking mlo, K = 2 pretraining steps, both detach_masker_input settings: the engine's
    hypergradient (direct + indirect) equals the hand-written autograd to 1e-9 (float64)."""
    from test_problems_tiny import batches
    K, lr_pre, lr_ft = 2, 0.05, 0.5
    eng, mods = mlo_graph("unroll", K=K, lr_pre=lr_pre, lr_ft=lr_ft, detach=detach)
    expected = by_hand(mods, batches(), K, lr_pre, lr_ft, detach)   # before any step: initial state
    assert eng.schedule == ["pretrain", "pretrain", "finetune", "mask"]
    eng.prefix("mask")
    _, direct, hyper = eng.gradient("mask")
    assert float(flat(direct).abs().max()) == 0.0      # the downstream loss never reads the masker
    got, want = flat(hyper), flat(expected)
    assert float(want.norm()) > 1e-6                    # a real signal reaches the masker
    assert float((got - want).norm() / want.norm()) < 1e-9
    # both paths of the graph exist: through the head and straight through pretraining
    assert eng.graph.paths("mask") == [["mask", "pretrain", "mask"],
                                       ["mask", "finetune", "pretrain", "mask"]]


def one_step_hypergradients(detach, freeze_embed, lr_pre=1e-4, lr_ft=1e-3):
    """(exact unroll, DARTS with scale = lr) of the masker, one SGD step per lower level."""
    eng_u, _ = mlo_graph("unroll", K=1, lr_pre=lr_pre, lr_ft=lr_ft, detach=detach,
                         freeze_embed=freeze_embed)
    eng_u.prefix("mask")
    eng_d, _ = mlo_graph("darts", K=1, lr_pre=lr_pre, lr_ft=lr_ft, detach=detach,
                         freeze_embed=freeze_embed,
                         edge_methods={"pretrain": ("darts", {"scale": lr_pre, "alpha": 1e-5}),
                                       "finetune": ("darts", {"scale": lr_ft, "alpha": 1e-5})})
    eng_d.prefix("mask")
    return flat(eng_u.gradient("mask")[2]), flat(eng_d.gradient("mask")[2])


@pytest.mark.parametrize("detach,freeze_embed", [(False, False), (True, True), (True, False)])
def test_darts_agrees_with_exact_one_step_unroll(detach, freeze_embed):
    """One SGD step per lower level: the exact unroll is -lr (d2f/dT dθ) v at the step's start,
    DARTS with scale = lr the same product by central differences after the step, so they differ
    by O(lr). Measured: relative 0.27%, cosine 0.999997 at lr 1e-4 / 1e-3 (5.5% at 2e-3 / 1e-2);
    we allow 1% and 0.9999. The masker's input either carries its gradient (official wiring), or
    is the trained patch embedding detached, or that embedding is frozen."""
    exact, fd = one_step_hypergradients(detach, freeze_embed)
    assert float(F.cosine_similarity(exact, fd, dim=0)) > 0.9999
    assert float((exact - fd).norm() / exact.norm()) < 0.01


def test_darts_holds_the_detached_masker_input_fixed():
    """With detach_masker_input (our default) the masker's input is a stop-gradient of the
    trained patch embedding: data to the masker, which no method differentiates. A finite
    difference re-evaluates the pretraining loss at θ +- εv; recomputed there, the embeddings
    would move with θ and DARTS would difference that path as well. Held at the step's values
    while the engine replays the batch (``Reconstruction.masker_input``), DARTS agrees with the
    exact unroll (above, < 1%); recomputed, it differed from it by 8.9% on this graph, a term
    that does not shrink with the learning rate. Here the recomputed value is forced back in to
    show the size of that term."""
    from problems.pretrain import Reconstruction
    exact, fd = one_step_hypergradients(detach=True, freeze_embed=False)
    held = Reconstruction.masker_input
    try:   # what the loss did before the input was held: embeddings recomputed at θ +- εv
        Reconstruction.masker_input = lambda self, imgs, masker, hold=False: None
        _, moved = one_step_hypergradients(detach=True, freeze_embed=False)
    finally:
        Reconstruction.masker_input = held
    assert float((exact - fd).norm() / exact.norm()) < 0.01
    assert 0.05 < float((exact - moved).norm() / exact.norm()) < 0.15


def lower_of_pretrain(eng):
    """The pretraining level as the hypergradient methods see it, at the state after prefix."""
    pre = eng.problems["pretrain"]
    batch = pre.last_batch
    return LowerLevel(params=pre.params(), loss=lambda: pre.loss(batch)[0], lr=pre.lr)


def test_neumann_and_cg_differentiate_twice_through_the_vit():
    """On the pretraining level (masking mlo, the official wiring so that the lower loss is one
    function of θ and T): Neumann with no extra term, -eta (d2f/dT dθ) v by double backward,
    equals DARTS' central difference with scale eta to 1e-6; one CG iteration,
    (vᵀv / vᵀHv) * -(d2f/dT dθ) v, equals it with vᵀHv from finite differences of gradients."""
    eng, mods = mlo_graph("darts", K=1, detach=False)
    eng.prefix("mask")
    lower = lower_of_pretrain(eng)
    inputs = list(mods["masker"].parameters())
    g = torch.Generator().manual_seed(7)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in lower.params]
    ref = flat(Darts(alpha=1e-5, scale=1.0)(v, lower, inputs))
    n0 = flat(Neumann(iters=0, eta=1.0)(v, lower, inputs))
    assert float(ref.norm()) > 1e-6
    assert float((n0 - ref).norm() / ref.norm()) < 1e-6

    eps = 1e-5
    saved = [p.detach().clone() for p in lower.params]

    def grad_at(sign):
        with torch.no_grad():
            for p, s, d in zip(lower.params, saved, v):
                p.copy_(s + sign * eps * d)
        return torch.autograd.grad(lower.loss(), lower.params)

    gp, gm = grad_at(1.0), grad_at(-1.0)
    with torch.no_grad():
        for p, s in zip(lower.params, saved):
            p.copy_(s)
    vhv = sum(((a - b) / (2 * eps) * d).sum() for a, b, d in zip(gp, gm, v))
    vv = sum((d * d).sum() for d in v)
    c1 = flat(CG(iters=1, tol=0.0)(v, lower, inputs))
    assert float((c1 - (vv / vhv) * n0).norm() / c1.norm()) < 1e-5


def test_fused_attention_is_what_breaks_second_order_and_auto_switches_it_off():
    """The same Neumann product with the MAE's fused attention on fails on the CPU; the
    builder's ``fused_attention: auto`` turns it off exactly when a push through pretrain uses
    unroll, neumann or cg."""
    eng, mods = mlo_graph("darts", K=1)
    eng.prefix("mask")
    lower = lower_of_pretrain(eng)
    v = [torch.ones_like(p) for p in lower.params]
    set_fused_attention(mods["mae"], True)
    try:
        Neumann(iters=0, eta=1.0)(v, lower, list(mods["masker"].parameters()))
    except RuntimeError as e:
        assert "derivative" in str(e) or "not implemented" in str(e)
    else:
        pytest.skip("this torch build double-differentiates fused CPU attention")
    finally:
        set_fused_attention(mods["mae"], False)

    def flags(eng, mods):
        chosen = choose_attention(None, eng)   # every problem's setting auto
        return chosen["pretrain"], {a.fused_attn for a in mods["mae"].modules()
                                    if hasattr(a, "fused_attn")}

    assert flags(*mlo_graph("darts", K=1)) == (True, {True})
    cg_on_one_edge = mlo_graph("darts", K=1, edge_methods={"pretrain": ("cg", {"iters": 3})})
    assert flags(*cg_on_one_edge) == (False, {False})
    assert flags(*mlo_graph("unroll", K=1)) == (False, {False})


@pytest.mark.parametrize("method", ["neumann", "cg"])
def test_engine_runs_implicit_methods_through_the_mae(method):
    """A full outer step under neumann / cg: finite, non-zero hypergradient for the masker."""
    eng, mods = mlo_graph(method, K=1, options={"iters": 2})
    before = [p.detach().clone() for p in mods["masker"].parameters()]
    recs = eng.step()
    mask_rec = [r for r in recs if r.problem == "mask"][0]
    assert torch.isfinite(mask_rec.hypergrad_norm) and float(mask_rec.hypergrad_norm) > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, mods["masker"].parameters()))
