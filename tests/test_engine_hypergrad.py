"""The engine's assembled hypergradients against explicit autograd, higher and closed forms."""

from __future__ import annotations

import pytest
import torch

from bilevel import (DT, Const, RidgeLower, ValUpper, Vector, regression, ridge_ift, ridge_inner,
                     wls_inner)
from mlomae.engine import Callback, Dependency, Engine, Problem
from mlomae.engine import diffopt


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ridge_engine(method, K, opt="sgd", lr=0.1, options=None, d=5, seed=0, hyper_init=None):
    X, y = regression(200, d, seed)
    Xv, yv = regression(100, d, seed + 1)
    theta = Vector(d, 0.1)
    hyper = Vector(d, 0.0)
    if hyper_init is not None:
        with torch.no_grad():
            hyper.value.copy_(hyper_init)
    if opt == "sgd":
        o = torch.optim.SGD(theta.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01)
    elif opt == "plain_sgd":
        o = torch.optim.SGD(theta.parameters(), lr=lr)
    elif opt == "adam":
        o = torch.optim.Adam(theta.parameters(), lr=lr, weight_decay=0.01)
    else:
        o = torch.optim.AdamW(theta.parameters(), lr=lr, weight_decay=0.01)
    lower = RidgeLower("lower", theta, optimizer=o, data=Const((X, y)), steps=K, reads=["hyper"])
    upper = ValUpper("hyper", hyper, optimizer=torch.optim.SGD(hyper.parameters(), lr=0.1),
                     data=Const((Xv, yv)), reads=["lower"])
    eng = Engine([lower, upper], [Dependency("hyper", "lower")], method=method, options=options or {})
    return eng, (X, y, Xv, yv)


def explicit_unroll(K, opt, lr, X, y, Xv, yv, d=5):
    """Autograd through K optimizer steps written out by hand (the torch.optim formulas)."""
    loglam = torch.zeros(d, dtype=DT, requires_grad=True)
    theta = torch.full((d,), 0.1, dtype=DT)
    buf = m = v = None
    for t in range(1, K + 1):
        g = torch.autograd.grad(ridge_inner(theta if theta.requires_grad else theta.requires_grad_(),
                                            loglam, X, y), theta, create_graph=True)[0]
        if opt == "sgd":  # momentum 0.9, nesterov, weight decay 0.01
            g = g + 0.01 * theta
            buf = g if buf is None else 0.9 * buf + g
            theta = theta - lr * (g + 0.9 * buf)
        else:  # adam, L2 weight decay 0.01
            g = g + 0.01 * theta
            m = (1 - 0.9) * g if m is None else 0.9 * m + 0.1 * g
            v = (1 - 0.999) * g * g if v is None else 0.999 * v + 0.001 * g * g
            mh, vh = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
            theta = theta - lr * mh / (vh.sqrt() + 1e-8)
    F = ((Xv @ theta - yv) ** 2).mean() / 2
    return torch.autograd.grad(F, loglam)[0]


@pytest.mark.parametrize("opt,lr", [("sgd", 0.05), ("adam", 0.01)])
def test_unroll_equals_explicit_autograd(opt, lr):
    K = 4
    eng, (X, y, Xv, yv) = ridge_engine("unroll", K, opt=opt, lr=lr)
    eng.prefix("hyper")
    _, direct, hyper = eng.gradient("hyper")
    expected = explicit_unroll(K, opt, lr, X, y, Xv, yv)
    assert rel(direct[0] + hyper[0], expected) < 1e-10


def test_unroll_equals_higher():
    """higher 0.2.1's differentiable SGD (momentum, nesterov, weight decay) over the same steps."""
    higher = pytest.importorskip("higher")
    K, lr = 5, 0.05
    eng, (X, y, Xv, yv) = ridge_engine("unroll", K, opt="sgd", lr=lr)
    eng.prefix("hyper")
    _, direct, hyper = eng.gradient("hyper")

    theta, loglam = Vector(5, 0.1), Vector(5, 0.0)
    opt = torch.optim.SGD(theta.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01)
    with higher.innerloop_ctx(theta, opt, copy_initial_weights=True) as (fm, diffopt_):
        for _ in range(K):
            diffopt_.step(ridge_inner(fm(), loglam(), X, y))
        F = ((Xv @ fm() - yv) ** 2).mean() / 2
        theirs = torch.autograd.grad(F, loglam.value)[0]
    assert rel(direct[0] + hyper[0], theirs) < 1e-10


@pytest.mark.parametrize("method,options,tol", [("cg", {"iters": 20}, 1e-6),
                                                ("neumann", {"iters": 400, "eta": 0.4}, 1e-6)])
def test_implicit_methods_through_engine_reach_ift(method, options, tol):
    """Lower run to convergence (400 plain SGD steps on a well-conditioned ridge), then the
    engine's hypergradient equals the implicit-function-theorem value at θ*."""
    eng, (X, y, Xv, yv) = ridge_engine(method, 400, opt="plain_sgd", lr=0.5, options=options)
    eng.prefix("hyper")
    exact, theta_star = ridge_ift(torch.zeros(5, dtype=DT), X, y, Xv, yv)
    assert rel(eng.problems["lower"].module.value.detach(), theta_star) < 1e-12
    _, direct, hyper = eng.gradient("hyper")
    assert float(direct[0].abs().max()) == 0.0  # F does not read λ directly
    assert rel(hyper[0], exact) < tol


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_differentiable_updates_reproduce_torch_optim(opt):
    """diffopt.step over 6 steps equals torch.optim's own steps, state included."""
    g = torch.Generator().manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(7, generator=g, dtype=DT))
    p_diff = torch.nn.Parameter(p_ref.detach().clone())
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.05),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.99), weight_decay=0.05),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05)}[opt]
    ref, mine = make([p_ref]), make([p_diff])
    grads = [torch.randn(7, generator=g, dtype=DT) for _ in range(6)]
    t = p_diff.detach().clone().requires_grad_(True)
    states = diffopt.initial_states(mine, [p_diff])
    for gr in grads:
        p_ref.grad = gr.clone()
        ref.step()
        (t,), states = diffopt.step(mine, [p_diff], [t], [gr.clone()], states)
    assert torch.allclose(t.detach(), p_ref.detach(), rtol=0, atol=1e-13)
    diffopt.write_back(mine, [p_diff], states)
    for k, val in ref.state[p_ref].items():
        assert torch.allclose(torch.as_tensor(mine.state[p_diff][k], dtype=DT),
                              torch.as_tensor(val, dtype=DT), rtol=0, atol=1e-13), k


# -- a three-level graph: chained unroll equals autograd through every level -------------

class Pretrain(Problem):
    """Weighted least squares whose per-sample weights σ(T) belong to the mask problem."""

    def loss(self, batch):
        X, y = batch
        return wls_inner(self.module(), self.read("mask")(), X, y)


class Finetune(Problem):
    """Fits targets shifted by the pretrained vector: reads pretrain (below it)."""

    def loss(self, batch):
        X, y = batch
        c, e = self.module(), self.read("pretrain")()
        return ((X @ (c + e) - y) ** 2).mean() / 2 + 0.05 * (c ** 2).sum()


class Mask(Problem):
    def loss(self, batch):
        X, y = batch
        c, e = self.read("finetune")(), self.read("pretrain")()
        return ((X @ (c + 0.5 * e) - y) ** 2).mean() / 2


def three_level(method, K_pre=3, options=None):
    d, n = 4, 30
    Xp, yp = regression(n, d, 10, noise=0.5)
    Xf, yf = regression(40, d, 11)
    Xm, ym = regression(25, d, 12)
    E, C, T = Vector(d, 0.2), Vector(d, -0.1), Vector(n, 0.0)
    with torch.no_grad():
        T.value.copy_(0.5 * torch.randn(n, generator=torch.Generator().manual_seed(13), dtype=DT))
    pre = Pretrain("pretrain", E, optimizer=torch.optim.SGD(E.parameters(), lr=0.3, momentum=0.5),
                   data=Const((Xp, yp)), steps=K_pre, reads=["mask"])
    ft = Finetune("finetune", C, optimizer=torch.optim.SGD(C.parameters(), lr=0.2),
                  data=Const((Xf, yf)), steps=1, reads=["pretrain"])
    mk = Mask("mask", T, optimizer=torch.optim.SGD(T.parameters(), lr=1.0),
              data=Const((Xm, ym)), reads=["finetune", "pretrain"])
    deps = [Dependency("mask", "pretrain"), Dependency("finetune", "pretrain"),
            Dependency("mask", "finetune")]
    eng = Engine([pre, ft, mk], deps, method=method, options=options or {})
    return eng, (Xp, yp, Xf, yf, Xm, ym), (E, C, T)


def test_three_level_chained_unroll_equals_autograd_through_all_levels():
    K = 3
    eng, (Xp, yp, Xf, yf, Xm, ym), (E, C, T) = three_level("unroll", K)
    assert eng.schedule == ["pretrain"] * K + ["finetune", "mask"]
    T0, E0, C0 = T.value.detach().clone(), E.value.detach().clone(), C.value.detach().clone()
    eng.prefix("mask")
    _, direct, hyper = eng.gradient("mask")

    t = T0.clone().requires_grad_(True)
    e, buf = E0.clone().requires_grad_(True), None
    for _ in range(K):  # SGD momentum 0.5, lr 0.3
        g = torch.autograd.grad(wls_inner(e, t, Xp, yp), e, create_graph=True)[0]
        buf = g if buf is None else 0.5 * buf + g
        e = e - 0.3 * buf
    c = C0.clone().requires_grad_(True)
    gc = torch.autograd.grad(((Xf @ (c + e) - yf) ** 2).mean() / 2 + 0.05 * (c ** 2).sum(), c,
                             create_graph=True)[0]
    c = c - 0.2 * gc
    F = ((Xm @ (c + 0.5 * e) - ym) ** 2).mean() / 2
    expected = torch.autograd.grad(F, t)[0]
    assert rel(direct[0] + hyper[0], expected) < 1e-10
    # both paths carry something: through finetune and directly through pretrain
    assert [p for p in eng.graph.paths("mask")] == [["mask", "finetune", "pretrain", "mask"],
                                                    ["mask", "pretrain", "mask"]]


def test_finetune_gets_only_its_direct_gradient():
    """pretrain's loss does not read finetune, so no path returns to finetune: no plan, and
    the engine computes no hypergradient for it."""
    eng, _, _ = three_level("darts")
    assert "finetune" not in eng.graph.plans
    assert set(eng.graph.plans) == {"mask"}


def test_darts_chain_matches_formula_composition():
    """Chained DARTS on the three-level graph equals the two pushes done by hand with the
    same finite differences (adjoints summed before the push through pretrain)."""
    from mlomae.hypergrad import METHODS, LowerLevel
    eng, (Xp, yp, Xf, yf, Xm, ym), (E, C, T) = three_level("darts", options={"alpha": 0.01})
    eng.prefix("mask")
    state = {k: v.value.detach().clone() for k, v in (("E", E), ("C", C), ("T", T))}
    _, _, hyper = eng.gradient("mask")

    e = state["E"].clone().requires_grad_(True)
    c = state["C"].clone().requires_grad_(True)
    t = state["T"].clone().requires_grad_(True)
    F = ((Xm @ (c + 0.5 * e) - ym) ** 2).mean() / 2
    vc, ve = torch.autograd.grad(F, [c, e])
    ft = LowerLevel([c], lambda: ((Xf @ (c + e) - yf) ** 2).mean() / 2 + 0.05 * (c ** 2).sum())
    (to_e,) = METHODS["darts"](alpha=0.01)([vc], ft, [e])
    pre = LowerLevel([e], lambda: wls_inner(e, t, Xp, yp))
    (to_t,) = METHODS["darts"](alpha=0.01)([ve + to_e], pre, [t])
    assert rel(hyper[0], to_t) < 1e-10


# -- exact DARTS on the recorded step ---------------------------------------------------------

def test_recorded_exact_darts_equals_one_step_unroll():
    """One plain SGD step θ1 = θ0 - lr ∇θ f(θ0, λ): the exact unroll is -lr (∂²f/∂λ∂θ)(θ0) v,
    which is exact DARTS with scale = lr taken at the step's start, the point the recorded step
    keeps (f's mixed derivative depends on θ here, so the point matters)."""
    lr = 0.1
    got_eng, _ = ridge_engine("darts", 1, opt="plain_sgd", lr=lr,
                              options={"exact": True, "scale": lr})
    ref_eng, _ = ridge_engine("unroll", 1, opt="plain_sgd", lr=lr)
    assert got_eng.graph.recorded() == {"lower"} and ref_eng.graph.recorded() == set()
    for eng in (got_eng, ref_eng):
        eng.prefix("hyper")
    _, d_got, h_got = got_eng.gradient("hyper")
    _, d_ref, h_ref = ref_eng.gradient("hyper")
    assert torch.equal(d_got[0], d_ref[0])   # the validation loss does not read λ: zeros
    assert h_ref[0].norm() > 0 and rel(h_got[0], h_ref[0]) < 1e-12


def test_recorded_exact_darts_evaluates_no_lower_loss_of_its_own():
    """Count the lower loss's evaluations in one outer step (K = 3 steps): finite differences
    take two more, exact DARTS on the recorded step none; the steps themselves are the same
    (parameters after the outer step equal those of the plain darts engine exactly)."""
    counts = {}
    engines = {}
    for name, opts in (("fd", {}), ("exact", {"exact": True})):
        eng, _ = ridge_engine("darts", 3, opt="sgd", options=opts)
        lower = eng.problems["lower"]
        counts[name] = 0
        original = lower.loss

        def counted(batch, original=original, name=name):
            counts[name] += 1
            return original(batch)

        lower.loss = counted
        eng.step()
        engines[name] = eng
    assert counts == {"fd": 3 + 2, "exact": 3}
    fd, ex = (engines[n].problems["lower"].module.value for n in ("fd", "exact"))
    assert torch.equal(fd, ex)


def test_edge_option_block_follows_the_edge_whatever_its_method():
    """`{upper: mask, lower: finetune, hypergrad: {darts: {exact: true}}}`: exact on that edge
    while the method is darts; a sweep that swaps the default method drops it there."""
    from mlomae.engine.graph import Graph
    from mlomae.hypergrad.cg import CG
    from mlomae.hypergrad.darts import Darts
    reads = {"pretrain": ["mask"], "finetune": ["pretrain"], "mask": ["pretrain", "finetune"]}
    deps = [Dependency("mask", "pretrain"), Dependency("finetune", "pretrain"),
            Dependency("mask", "finetune", method_options={"darts": {"exact": True}})]
    steps = {"pretrain": 2, "finetune": 1, "mask": 1}
    g = Graph(steps, reads, deps, default_method="darts", default_options={"alpha": 0.02})
    assert g.plans["mask"].methods == {"finetune": Darts(alpha=0.02, exact=True),
                                       "pretrain": Darts(alpha=0.02)}
    assert g.recorded() == {"finetune"}
    # the mask step reads the fine-tune step's record; nothing reads the pretraining steps
    cycle = ["pretrain", "pretrain", "finetune", "mask"]
    assert g.step_readers(cycle) == {"finetune": [1]}
    g = Graph(steps, reads, deps, default_method="unroll")
    assert g.step_readers(cycle) == {"finetune": [1], "pretrain": [0, 1]}
    g = Graph(steps, reads, deps, default_method="cg", default_options={"iters": 3})
    assert g.plans["mask"].methods == {"finetune": CG(iters=3), "pretrain": CG(iters=3)}
    assert g.recorded() == set()


class TwoHyperLower(Problem):
    """Ridge in λ = read("a") plus a θ-dependent term in read("b"): ∂²f/∂b∂θ = σ'(b) θ depends
    on θ, so an upper pushing through this lower sees where its parameters were taken."""

    def loss(self, batch):
        X, y = batch
        theta = self.module()
        return ridge_inner(theta, self.read("a")(), X, y) + 0.5 * (
            torch.sigmoid(self.read("b")()) * theta ** 2).sum()


def two_uppers(method_a, options_a, method_b, lr=0.1, d=5, options_b=None):
    X, y = regression(200, d, 0)
    theta, a, b = Vector(d, 0.1), Vector(d, 0.0), Vector(d, 0.3)
    lower = TwoHyperLower("lower", theta, optimizer=torch.optim.SGD(theta.parameters(), lr=lr),
                          data=Const((X, y)), steps=1, reads=["a", "b"])
    uppers = [ValUpper(n, v, optimizer=torch.optim.SGD(v.parameters(), lr=0.5),
                       data=Const(regression(100, d, s)), reads=["lower"])
              for n, v, s in (("a", a, 1), ("b", b, 2))]
    deps = [Dependency("a", "lower", method=method_a, options=options_a),
            Dependency("b", "lower", method=method_b, options=options_b or {})]
    eng = Engine([lower, *uppers], deps, method="darts")
    eng.step()
    return eng, a.value.detach(), b.value.detach()


def test_two_uppers_on_one_recorded_lower_each_get_their_own_point():
    """Upper a pushes through the lower by exact DARTS on its recorded step, upper b through
    the same lower by finite-difference DARTS. a's update equals the one with the exact unroll
    on its edge; b's equals the one with finite differences on both edges, bit for bit (it
    reads the lower's real parameters after the step, not the step's records)."""
    lr = 0.1
    eng, a, b = two_uppers("darts", {"exact": True, "scale": lr}, "darts", lr=lr)
    assert eng.graph.recorded() == {"lower"}
    _, a_unroll, _ = two_uppers("unroll", {}, "darts", lr=lr)
    _, _, b_fd = two_uppers("darts", {}, "darts", lr=lr)
    a0, b0 = torch.zeros(5, dtype=DT), torch.full((5,), 0.3, dtype=DT)
    assert (a_unroll - a0).norm() > 0 and rel(a - a0, a_unroll - a0) < 1e-12
    assert (b_fd - b0).norm() > 0 and torch.equal(b, b_fd)


def test_two_exact_uppers_read_one_record():
    """Both uppers push through the lower by exact DARTS: the second reads the same recorded
    step as the first (its graph kept for it), so each equals the exact one-step unroll."""
    lr = 0.1
    exact = {"exact": True, "scale": lr}
    eng, a, b = two_uppers("darts", exact, "darts", lr=lr, options_b=exact)
    assert eng.graph.step_readers(eng.schedule) == {"lower": [2]}
    _, a_ref, b_ref = two_uppers("unroll", {}, "unroll", lr=lr)
    a0, b0 = torch.zeros(5, dtype=DT), torch.full((5,), 0.3, dtype=DT)
    assert rel(a - a0, a_ref - a0) < 1e-12
    assert rel(b - b0, b_ref - b0) < 1e-12


def test_hypergrad_cosine_logged_between_successive_steps_equals_closed_form():
    """``hypergrad_cosine`` of the upper's second step: the cosine of its two hypergradients.
    The lower converges each outer step (400 plain SGD steps), so with cg the two are the
    implicit-function-theorem values at λ0 = 0 and at λ1 = λ0 − η·h0 (plain SGD on the upper,
    η chosen so that λ moves by 0.5 at most; no direct gradient), computed here in closed form. The previous hypergradient
    is engine state: an engine loaded from the state logs the same cosine next."""
    def engine():
        eng, data = ridge_engine("cg", 400, opt="plain_sgd", lr=0.5, options={"iters": 20})
        eng.problems["hyper"].optimizer.param_groups[0]["lr"] = step
        logged = []

        class Grab(Callback):
            def on_problem_step(self, engine, r):
                if r.problem == "hyper":
                    logged.append(r.logs.get("hypergrad_cosine"))

        eng.callbacks = [Grab()]
        return eng, data, logged

    X, y = regression(200, 5, 0)
    Xv, yv = regression(100, 5, 1)
    h0, _ = ridge_ift(torch.zeros(5, dtype=DT), X, y, Xv, yv)
    step = float(0.5 / h0.abs().max())          # λ1 moves by 0.5 at most: the lower still converges
    h1, _ = ridge_ift(-step * h0, X, y, Xv, yv)
    eng, _, logged = engine()
    eng.run(2)
    want = float(h0 @ h1 / (h0.norm() * h1.norm()))
    assert logged[0] is None                    # nothing to compare the first one with
    assert want < 0.999                         # the two directions do differ
    assert abs(float(logged[1]) - want) < 1e-6
    other, _, resumed = engine()
    other.load_state_dict(eng.state_dict())
    eng.run(3)
    other.run(3)
    assert float(resumed[0]) == float(logged[2])
