"""Question 3a: mlomae against Betty, higher and TorchOpt on a 2-level problem all of them express.

A 101k-parameter MLP (128-256-256-10, ReLU) trained by 5 plain SGD steps (lr 0.1) on one batch of
256 samples whose per-sample cross-entropies are weighted by σ(s); the upper problem learns the
256 logits s by the cross-entropy of the MLP on a validation batch of 256 (SGD, lr 0.1). One outer
step = the 5 lower steps + the hypergradient + the upper update, in every library.

Contenders per method:
  unroll   mlomae, higher (innerloop_ctx), TorchOpt (MetaSGD), Betty (IterativeProblem)
  darts    mlomae, Betty
  neumann  mlomae, Betty                      (K=5, η = the lower lr 0.1)
  cg       mlomae, TorchOpt (custom_root + solve_cg), Betty   (K=5)
  sama     mlomae, Betty                      (the lower trained by Adam, lr 1e-3: with SGD SAMA
                                               is DARTS; α = 1, Betty's default)
Before timing, every contender takes one outer step from the same state and the hypergradient it
applies is compared with mlomae's. Betty's released CG is wrong: it is also checked against the
closed form of a weighted least-squares problem (tests/bilevel.py), where exact CG is exact.

    benchmarks/.venv-bench/bin/python benchmarks/peers_mlp.py [--quick]
"""

from __future__ import annotations

import copy
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

import common
from mlomae.engine import Dependency, Engine, Problem

N, D_IN, HIDDEN, CLASSES = 256, 128, 256, 10
INNER_STEPS, LR, UPPER_LR, K = 5, 0.1, 0.1, 5
METHODS = ["unroll", "darts", "neumann", "cg", "sama"]
# the lower's optimizer per method: SGD (lr 0.1), except Adam (lr 1e-3) for sama, which with
# SGD would be darts
LOWER_OPTIMIZER = {"sama": lambda params: torch.optim.Adam(params, lr=1e-3)}


def lower_optimizer(method, params):
    return LOWER_OPTIMIZER.get(method, lambda ps: torch.optim.SGD(ps, lr=LR))(params)


# -- the task ---------------------------------------------------------------------------------

def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


class Logits(nn.Module):
    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(s.clone())

    def forward(self) -> torch.Tensor:
        return self.value


class Repeat:
    """An endless source of one fixed batch (data in memory for every library alike)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    X, Xv = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    y = (X @ teacher).argmax(1)
    y[: N // 4] = torch.randint(0, CLASSES, (N // 4,), generator=g)  # noisy labels to down-weight
    yv = (Xv @ teacher).argmax(1)
    torch.manual_seed(seed)
    net = mlp()
    s0 = 0.5 * torch.randn(N, generator=g)
    return (X, y), (Xv, yv), net.state_dict(), s0


def weighted_ce(out, y, s):
    return (torch.sigmoid(s) * F.cross_entropy(out, y, reduction="none")).mean()


# -- contenders: each has step() (one outer step) and box['grads'] (the applied hypergradient) --

class Mlomae:
    class Inner(Problem):
        def loss(self, batch):
            x, y = batch
            return weighted_ce(self.module(x), y, self.read("weights")())

    class Outer(Problem):
        def loss(self, batch):
            x, y = batch
            return F.cross_entropy(self.read("inner")(x), y)

    def __init__(self, method, train, val, state, s0):
        net, w = mlp(), Logits(s0)
        net.load_state_dict(state)
        self.net, self.s = net, w.value
        inner = self.Inner("inner", net, optimizer=lower_optimizer(method, net.parameters()),
                           data=Repeat(train), steps=INNER_STEPS, reads=["weights"])
        outer = self.Outer("weights", w, optimizer=torch.optim.SGD(w.parameters(), lr=UPPER_LR),
                           data=Repeat(val), reads=["inner"])
        opts = {"darts": {"alpha": 0.01}, "neumann": {"iters": K, "eta": LR},
                "cg": {"iters": K}, "sama": {"alpha": 1.0}}.get(method, {})
        self.engine = Engine([inner, outer], [Dependency("weights", "inner")], method=method,
                             options=opts)
        self.box = common.grad_capture(outer.optimizer)

    def step(self):
        self.engine.step()


class Higher:
    def __init__(self, method, train, val, state, s0):
        import higher
        self.higher = higher
        self.net = mlp()
        self.net.load_state_dict(state)
        self.s = s0.clone().requires_grad_(True)
        self.inner_opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.upper = torch.optim.SGD([self.s], lr=UPPER_LR)
        self.train, self.val = train, val
        self.box = common.grad_capture(self.upper)

    def step(self):
        (x, y), (xv, yv) = self.train, self.val
        with self.higher.innerloop_ctx(self.net, self.inner_opt, copy_initial_weights=True) as (fnet, dopt):
            for _ in range(INNER_STEPS):
                dopt.step(weighted_ce(fnet(x), y, self.s))
            self.s.grad = torch.autograd.grad(F.cross_entropy(fnet(xv), yv), self.s)[0]
            with torch.no_grad():  # the lower problem continues from where it stopped
                for p, q in zip(self.net.parameters(), fnet.parameters()):
                    p.copy_(q)
        self.upper.step()


class TorchOptMetaSGD:
    def __init__(self, method, train, val, state, s0):
        import torchopt
        self.torchopt = torchopt
        self.net = mlp()
        self.net.load_state_dict(state)
        self.s = s0.clone().requires_grad_(True)
        self.meta = torchopt.MetaSGD(self.net, lr=LR)
        self.upper = torch.optim.SGD([self.s], lr=UPPER_LR)
        self.train, self.val = train, val
        self.box = common.grad_capture(self.upper)

    def step(self):
        (x, y), (xv, yv) = self.train, self.val
        self.torchopt.stop_gradient(self.net)       # start from the last state, no older graph
        self.torchopt.stop_gradient(self.meta)
        for _ in range(INNER_STEPS):
            self.meta.step(weighted_ce(self.net(x), y, self.s))
        self.s.grad = torch.autograd.grad(F.cross_entropy(self.net(xv), yv), self.s)[0]
        self.upper.step()


class TorchOptCG:
    """TorchOpt's implicit differentiation: custom_root over the stationarity condition, solved
    by solve_cg (maxiter=K, rtol=0 so it takes all K iterations like the others)."""

    def __init__(self, method, train, val, state, s0):
        import torchopt
        from torch.func import functional_call, grad
        self.net = mlp()
        self.net.load_state_dict(state)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.params = tuple(p.detach().clone() for p in self.net.parameters())
        self.s = s0.clone().requires_grad_(True)
        self.upper = torch.optim.SGD([self.s], lr=UPPER_LR)
        self.train, self.val = train, val
        self.box = common.grad_capture(self.upper)
        names, net = self.names, self.net

        def inner_loss(params, s, x, y):
            return weighted_ce(functional_call(net, dict(zip(names, params)), (x,)), y, s)

        def stationary(params, s, x, y):
            return grad(inner_loss)(params, s, x, y)

        @torchopt.diff.implicit.custom_root(
            stationary, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0))
        def solve(params, s, x, y):
            sd = s.detach()
            with torch.enable_grad():  # custom_root runs the solver inside autograd.Function
                for _ in range(INNER_STEPS):
                    params = tuple(p.detach().requires_grad_(True) for p in params)
                    gs = torch.autograd.grad(inner_loss(params, sd, x, y), params)
                    params = tuple(p.detach() - LR * g for p, g in zip(params, gs))
            return params

        self.solve, self.functional_call = solve, functional_call

    def step(self):
        (x, y), (xv, yv) = self.train, self.val
        params = self.solve(self.params, self.s, x, y)
        out = self.functional_call(self.net, dict(zip(self.names, params)), (xv,))
        self.s.grad = torch.autograd.grad(F.cross_entropy(out, yv), self.s)[0]
        self.params = tuple(p.detach() for p in params)
        self.upper.step()


class Betty:
    """Betty 0.2.1 as its users write it: ImplicitProblem (darts/neumann/cg) or IterativeProblem
    (unroll), u2l {weights: [inner]}, l2u {inner: [weights]}, inner unroll_steps=5."""

    def __init__(self, method, train, val, state, s0):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine as BEngine
        from betty.problems import HigherIterativeProblem, ImplicitProblem
        from betty.logging.logger_base import get_logger
        get_logger().setLevel(logging.WARNING)  # betty sets INFO on its first use
        net, w = mlp(), Logits(s0)
        net.load_state_dict(state)
        iterative = method == "unroll"

        if iterative:
            # Betty's IterativeProblem (functorch) fails at initialisation in 0.2.1 (it patches
            # its optimizer twice: KeyError 'params'); its higher-based twin runs.
            class Inner(HigherIterativeProblem):
                _fp16 = False  # shim 1: betty 0.2.1 reads this attribute but never sets it

                def initialize(self):
                    # shim 2: initialize() already monkey-patches module and optimizer, which
                    # each window start patches again (higher refuses a patched module)
                    super().initialize()
                    self.module, self.optimizer = self.module_orig, self.optimizer_orig

                def training_step(self, batch):
                    x, y = batch
                    return weighted_ce(self.module(x), y, self.weights.module())

            class Outer(ImplicitProblem):
                def training_step(self, batch):
                    x, y = batch
                    return F.cross_entropy(self.inner.module(x), y)
        else:
            class Inner(ImplicitProblem):
                def training_step(self, batch):
                    x, y = batch
                    return weighted_ce(self.module(x), y, self.weights.module())

            class Outer(ImplicitProblem):
                def training_step(self, batch):
                    x, y = batch
                    return F.cross_entropy(self.inner.module(x), y)

        inner_cfg = Config(type=method if not iterative else "darts", unroll_steps=INNER_STEPS,
                           darts_alpha=0.01, neumann_iterations=K, neumann_alpha=LR,
                           cg_iterations=K, cg_alpha=1.0, sama_adam_alpha=1.0)
        outer_cfg = Config(retain_graph=True, first_order=not iterative)
        inner = Inner("inner", inner_cfg, module=net,
                      optimizer=lower_optimizer(method, net.parameters()), train_data_loader=Repeat(train))
        outer = Outer("weights", outer_cfg, module=w,
                      optimizer=torch.optim.SGD(w.parameters(), lr=UPPER_LR), train_data_loader=Repeat(val))
        self.engine = BEngine(config=EngineConfig(train_iters=10**9, logger_type="none"),
                              problems=[inner, outer],
                              dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
        self.box = common.grad_capture(outer.optimizer)

    def step(self):
        for _ in range(INNER_STEPS):
            self.engine.global_step += 1
            self.engine.train_step()


CONTENDERS = {
    "unroll": {"mlomae": Mlomae, "higher": Higher, "torchopt": TorchOptMetaSGD, "betty": Betty},
    "darts": {"mlomae": Mlomae, "betty": Betty},
    "neumann": {"mlomae": Mlomae, "betty": Betty},
    "cg": {"mlomae": Mlomae, "torchopt": TorchOptCG, "betty": Betty},
    "sama": {"mlomae": Mlomae, "betty": Betty},
}


# -- Betty's CG against a closed form ----------------------------------------------------------

def betty_cg_closed_form() -> dict:
    """Weighted least squares at its exact minimiser θ* (float64, d=5): CG with K=d iterations
    is exact, so each library's answer is compared with the implicit-function-theorem value."""
    from types import SimpleNamespace

    import torchopt
    from betty.hypergradient.cg import cg as betty_cg
    from torch.func import grad
    sys.path.insert(0, str(common.ROOT.parent / "tests"))
    from bilevel import regression, wls_ift, wls_inner
    from mlomae.hypergrad import METHODS as HG, LowerLevel
    d, n = 5, 40
    X, y = regression(n, d, 3)
    Xv, yv = regression(30, d, 4)
    s = (0.5 * torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         ).requires_grad_(True)
    exact, theta_star = wls_ift(s.detach(), X, y, Xv, yv)
    theta = theta_star.clone().requires_grad_(True)
    v = torch.autograd.grad(((Xv @ theta - yv) ** 2).mean() / 2, theta)[0]

    (ours,) = HG["cg"](iters=d)([v], LowerLevel([theta], lambda: wls_inner(theta, s, X, y)), [s])

    curr = SimpleNamespace(config=SimpleNamespace(cg_iterations=d, cg_alpha=1.0), paths=[],
                           cur_batch=None, training_step_exec=lambda b: wls_inner(theta, s, X, y),
                           trainable_parameters=lambda: [theta], parameters=lambda: [theta])
    prev = SimpleNamespace(trainable_parameters=lambda: [s])
    (theirs,) = betty_cg([v], curr, prev, sync=False)

    def stationary(th, s_):
        return grad(wls_inner)(th, s_, X, y)

    @torchopt.diff.implicit.custom_root(stationary, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=d, rtol=0.0))
    def solve(th, s_):
        return theta_star.clone()

    th = solve(theta_star.clone(), s)
    (to,) = torch.autograd.grad(((Xv @ th - yv) ** 2).mean() / 2, s)
    return {"mlomae": common.rel(ours, exact), "betty": common.rel(theirs, exact),
            "torchopt": common.rel(to, exact)}


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    args = common.parser(__doc__, repeats=30, quick_repeats=5).parse_args()
    repeats = common.setup(args)
    train, val, state, s0 = task()
    print(f"peers_mlp: MLP {sum(p.numel() for p in mlp().parameters())} params, batch {N}, "
          f"{INNER_STEPS} inner SGD steps, threads {args.threads}, {repeats} timed outer steps each")
    cf = betty_cg_closed_form()
    print("CG vs closed form (weighted least squares, K=d): " +
          ", ".join(f"{k} {v:.1e}" for k, v in cf.items() if v is not None))
    rows, results = [], {}
    for method in METHODS:
        available = {}
        for name, cls in CONTENDERS[method].items():
            try:
                available[name] = cls(method, train, val, copy.deepcopy(state), s0)
            except ImportError as e:  # a missing peer must not quietly change the comparison
                raise SystemExit(f"peer '{name}' cannot be imported ({e}): run `make bench` or "
                                 "`make bench-quick`, which install benchmarks/.venv-bench") from e
        for c in available.values():  # one outer step each from the same state
            c.step()
        ref = available["mlomae"].box["grads"]
        agree = {n: common.rel(c.box["grads"], ref) for n, c in available.items()}
        times = common.interleave({n: c.step for n, c in available.items()}, repeats, warmup=1)
        med = {n: common.median(t) for n, t in times.items()}
        for n in available:
            rows.append([method, n, 1e3 * med[n], med[n] / med["mlomae"], agree[n]])
        right = [n for n in available if n != "mlomae" and agree[n] < 1e-4]
        fastest = min(right, key=med.get) if right else None
        results[method] = {"median_s": med, "times_s": times, "rel_diff_vs_mlomae": agree,
                           "fastest_right_peer": fastest,
                           "ratio_vs_fastest_right_peer": med["mlomae"] / med[fastest] if fastest else None}
        print(f"  {method}: " + ", ".join(f"{n} {1e3 * med[n]:.1f} ms (rel {agree[n]:.1e})"
                                          for n in available), flush=True)
    print(common.table(rows, ["method", "library", "ms / outer step", "× mlomae",
                              "rel. diff vs mlomae"]))
    for m, r in results.items():
        if r["fastest_right_peer"]:
            print(f"HEADLINE 3a {m}: mlomae / fastest agreeing peer ({r['fastest_right_peer']}) = "
                  f"{r['ratio_vs_fastest_right_peer']:.2f}x (goal <= 1.0)")
    common.save("peers_mlp", {"methods": results, "cg_closed_form_rel_err": cf,
                              "setup": {"params": sum(p.numel() for p in mlp().parameters()),
                                        "batch": N, "inner_steps": INNER_STEPS, "K": K}}, args)


if __name__ == "__main__":
    main()
