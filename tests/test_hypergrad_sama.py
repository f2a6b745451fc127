"""SAMA against a hand computation (float64), against DARTS with an SGD lower level, and against
Betty's SAMA (a test-only oracle) on a small MLP whose lower level is trained by Adam."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import DT, Const, Vector, regression, ridge_inner
from mlomae.engine import Dependency, Engine, Problem
from mlomae.hypergrad import Keep, make


class Ridge(Problem):
    def loss(self, batch):
        X, y = batch
        return ridge_inner(self.module.value, self.read("hyper").value, X, y)


class Val(Problem):
    def loss(self, batch):
        X, y = batch
        return ((X @ self.read("lower").value - y) ** 2).mean() / 2


def ridge(method: str, opt: str, K: int, options=None, lr=0.05, d=4):
    X, y = regression(60, d, 0)
    Xv, yv = regression(40, d, 1)
    theta, lam = Vector(d, 0.3), Vector(d, 0.0)
    with torch.no_grad():
        lam.value.copy_(torch.linspace(-0.5, 0.5, d, dtype=DT))
    o = (torch.optim.Adam(theta.parameters(), lr=lr, betas=(0.8, 0.9), eps=1e-8) if opt == "adam"
         else torch.optim.SGD(theta.parameters(), lr=lr))
    lower = Ridge("lower", theta, optimizer=o, data=Const((X, y)), steps=K, reads=["hyper"])
    upper = Val("hyper", lam, optimizer=torch.optim.SGD(lam.parameters(), lr=0.1),
                data=Const((Xv, yv)), reads=["lower"])
    eng = Engine([lower, upper], [Dependency("hyper", "lower")], method=method, options=options or {})
    return eng, (X, y, Xv, yv), lam.value.detach().clone()


def test_sama_declares_what_it_needs():
    m = make("sama")
    assert (m.alpha, m.keeps, m.second_order) == (1.0, Keep.STEP_GRADIENT, False)
    e = make("sama", {"exact": True})
    assert (e.keeps, e.second_order, e.precise_loss, e.applied_gradient) == (
        Keep.STEP_GRAPH, True, False, True)
    with pytest.raises(ValueError, match="alpha"):
        make("sama", {"alpha": 0})


def test_sama_equals_a_hand_computation_after_two_adam_steps():
    """Two Adam steps written out by hand (β = (0.8, 0.9), no bias correction in the Jacobian,
    as Betty): v' = lr [(1−β₁)β₂ s₁ − β₁(1−β₂) g₂ m₁] / (√s₂ + ε)³ ⊙ v, and for the ridge lower
    level the central difference of ∇_λ f = ½ e^λ θ² is exact: the push is −e^λ ⊙ θ₂ ⊙ v'."""
    lr, b1, b2, eps = 0.05, 0.8, 0.9, 1e-8
    eng, (X, y, Xv, yv), lam = ridge("sama", "adam", 2, lr=lr)
    eng.prefix("hyper")
    _, direct, hyper = eng.gradient("hyper")

    theta = torch.full((4,), 0.3, dtype=DT)
    m = s = torch.zeros(4, dtype=DT)
    for t in (1, 2):
        th = theta.clone().requires_grad_(True)
        g = torch.autograd.grad(ridge_inner(th, lam, X, y), th)[0]
        m_old, s_old = m, s
        m, s = b1 * m + (1 - b1) * g, b2 * s + (1 - b2) * g * g
        theta = theta - lr / (1 - b1 ** t) * m / ((s / (1 - b2 ** t)).sqrt() + eps)
    v = Xv.T @ (Xv @ theta - yv) / len(yv)
    v_pre = lr * ((1 - b1) * b2 * s_old - b1 * (1 - b2) * g * m_old) / (s.sqrt() + eps) ** 3 * v
    expected = -lam.exp() * theta * v_pre
    assert torch.equal(direct[0], torch.zeros(4, dtype=DT))
    torch.testing.assert_close(eng.problems["lower"].module.value.detach(), theta, rtol=0, atol=1e-15)
    torch.testing.assert_close(hyper[0], expected, rtol=1e-9, atol=0)


def test_exact_sama_equals_a_hand_computation_at_the_step_start():
    """exact: the same v' as above, the mixed term's limit on the graph the lower's last step
    kept, so at θ₁, the parameters step 2 started from: the push is −e^λ ⊙ θ₁ ⊙ v'. The lower
    keeps both the graph and the applied gradient g₂."""
    lr, b1, b2, eps = 0.05, 0.8, 0.9, 1e-8
    eng, (X, y, Xv, yv), lam = ridge("sama", "adam", 2, {"exact": True}, lr=lr)
    assert eng.graph.keeps["lower"] is Keep.STEP_GRAPH and eng.graph.applied == {"lower"}
    eng.prefix("hyper")
    _, _, hyper = eng.gradient("hyper")

    theta = torch.full((4,), 0.3, dtype=DT)
    m = s = torch.zeros(4, dtype=DT)
    for t in (1, 2):
        start = theta
        th = theta.clone().requires_grad_(True)
        g = torch.autograd.grad(ridge_inner(th, lam, X, y), th)[0]
        m_old, s_old = m, s
        m, s = b1 * m + (1 - b1) * g, b2 * s + (1 - b2) * g * g
        theta = theta - lr / (1 - b1 ** t) * m / ((s / (1 - b2 ** t)).sqrt() + eps)
    v = Xv.T @ (Xv @ theta - yv) / len(yv)
    v_pre = lr * ((1 - b1) * b2 * s_old - b1 * (1 - b2) * g * m_old) / (s.sqrt() + eps) ** 3 * v
    torch.testing.assert_close(eng.kept.gradients["lower"][0], g, rtol=0, atol=1e-15)
    torch.testing.assert_close(hyper[0], -lam.exp() * start * v_pre, rtol=1e-12, atol=0)


def test_sama_with_sgd_is_darts():
    """With an SGD lower optimizer the preconditioner is the identity: SAMA is DARTS with the
    same α, bit for bit."""
    a, _, _ = ridge("sama", "sgd", 3, {"alpha": 0.3})
    b, _, _ = ridge("darts", "sgd", 3, {"alpha": 0.3})
    for eng in (a, b):
        eng.prefix("hyper")
    ha, hb = a.gradient("hyper")[2][0], b.gradient("hyper")[2][0]
    assert ha.norm() > 0 and torch.equal(ha, hb)


def test_sama_refuses_an_optimizer_it_cannot_precondition():
    theta, lam = Vector(2), Vector(2)
    lower = Ridge("lower", theta, optimizer=torch.optim.RMSprop(theta.parameters()), reads=["hyper"])
    upper = Val("hyper", lam, optimizer=torch.optim.SGD(lam.parameters(), lr=0.1), reads=["lower"])
    from mlomae.errors import GraphError
    with pytest.raises(GraphError, match="sama preconditions .* not RMSprop"):
        Engine([lower, upper], [Dependency("hyper", "lower")], method="sama")


# -- Betty's SAMA on a small MLP (the shape of benchmarks/peers_mlp.py's problem) ---------------

N, D_IN, HIDDEN, CLASSES, K, LR = 64, 16, 32, 5, 3, 1e-2


def mlp_task():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(D_IN, CLASSES, generator=g, dtype=DT)
    X, Xv = torch.randn(N, D_IN, generator=g, dtype=DT), torch.randn(N, D_IN, generator=g, dtype=DT)
    y, yv = (X @ teacher).argmax(1), (Xv @ teacher).argmax(1)
    y[: N // 4] = torch.randint(0, CLASSES, (N // 4,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(DT)
    return (X, y), (Xv, yv), net, 0.5 * torch.randn(N, generator=g, dtype=DT)


def weighted_ce(out, y, s):
    return (torch.sigmoid(s) * F.cross_entropy(out, y, reduction="none")).mean()


class Logits(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.value = nn.Parameter(s.clone())

    def forward(self):
        return self.value


def capture(optimizer) -> dict:
    box: dict = {}
    optimizer.register_step_pre_hook(lambda opt, a, k: box.__setitem__(
        "grads", [p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]))
    return box


def mlomae_sama(alpha: float, outer_steps: int):
    import copy
    train, val, net, s0 = mlp_task()
    net, w = copy.deepcopy(net), Logits(s0)

    class Inner(Problem):
        def loss(self, batch):
            return weighted_ce(self.module(batch[0]), batch[1], self.read("weights")())

    class Outer(Problem):
        def loss(self, batch):
            return F.cross_entropy(self.read("inner")(batch[0]), batch[1])

    inner = Inner("inner", net, optimizer=torch.optim.Adam(net.parameters(), lr=LR),
                  data=Const(train), steps=K, reads=["weights"])
    outer = Outer("weights", w, optimizer=torch.optim.SGD(w.parameters(), lr=0.1),
                  data=Const(val), reads=["inner"])
    box = capture(outer.optimizer)
    eng = Engine([inner, outer], [Dependency("weights", "inner")], method="sama",
                 options={"alpha": alpha})
    out = []
    for _ in range(outer_steps):
        eng.step()
        out.append(box["grads"][0])
    return out


def betty_sama(alpha: float, outer_steps: int):
    import copy
    pytest.importorskip("betty")
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine as BEngine
    from betty.logging.logger_base import get_logger
    from betty.problems import ImplicitProblem
    get_logger().setLevel(logging.WARNING)
    train, val, net, s0 = mlp_task()
    net, w = copy.deepcopy(net), Logits(s0)

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return weighted_ce(self.module(batch[0]), batch[1], self.weights.module())

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return F.cross_entropy(self.inner.module(batch[0]), batch[1])

    inner = Inner("inner", Config(type="sama", unroll_steps=K, sama_adam_alpha=alpha), module=net,
                  optimizer=torch.optim.Adam(net.parameters(), lr=LR), train_data_loader=Const(train))
    outer = Outer("weights", Config(retain_graph=True, first_order=True), module=w,
                  optimizer=torch.optim.SGD(w.parameters(), lr=0.1), train_data_loader=Const(val))
    eng = BEngine(config=EngineConfig(train_iters=10**9, logger_type="none"),
                  problems=[inner, outer],
                  dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    box = capture(outer.optimizer)   # Betty rebuilds the optimizers when its engine starts
    out = []
    for _ in range(outer_steps):
        for _ in range(K):
            eng.global_step += 1
            eng.train_step()
        out.append(box["grads"][0])
    return out


def test_sama_matches_betty_on_an_mlp_with_adam():
    """Three outer steps (3 Adam steps of the MLP, then the upper's SAMA step) from the same
    state in float64: the hypergradient each library applies agrees to 5e-8 at every step (measured
    2e-9 to 8e-9: the finite difference is not exact on an MLP, and ε = α/‖v'‖ guards the norm
    with 1e-12 here, 1e-15 in Betty)."""
    theirs = betty_sama(1.0, 3)
    ours = mlomae_sama(1.0, 3)
    for a, b in zip(ours, theirs):
        assert a.norm() > 0
        assert float((a - b).norm() / b.norm()) < 5e-8


def test_the_kept_gradient_is_part_of_the_engine_state():
    """What SAMA reads outlives the outer step, so a checkpoint carries it: a fresh engine
    loaded from the state takes the same next step, bit for bit."""
    a, _, _ = ridge("sama", "adam", 2)
    import copy
    a.step()
    state = copy.deepcopy(a.state_dict())   # as a checkpoint does: no tensor shared with a
    assert set(state["kept_gradients"]) == {"lower"}
    b, _, _ = ridge("sama", "adam", 2)
    b.load_state_dict(state)
    assert torch.equal(b.kept.gradients["lower"][0], a.kept.gradients["lower"][0])
    a.step()
    b.step()
    for x, y in zip(a.problems["hyper"].params() + a.problems["lower"].params(),
                    b.problems["hyper"].params() + b.problems["lower"].params()):
        assert torch.equal(x, y)
