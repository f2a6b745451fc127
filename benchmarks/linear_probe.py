"""Issue "A regime where masking matters", evaluation: the linear protocol's stopping rule,
chosen on the `mask` split (the probe trains on `finetune` and is scored on `mask`; the test
split is not read), on raw pixels and on a run's frozen features.

One L-BFGS fit per weight decay runs to the old cap of 500 iterations; the classifier is
snapshotted along the way, so every candidate rule (an iteration cap, or a tolerance on the
loss's relative decrease over 10 iterations) is read off the same trajectory: its top-1 on
`mask`, its iterations, and its time. The headline: the chosen rule's time against 500
iterations (goal >= 3x faster) and its top-1 difference (goal within 0.1 points).

    benchmarks/.venv-bench/bin/python benchmarks/linear_probe.py [--run RUN_DIR] [--quick]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import common

CHECKPOINTS = (25, 50, 100, 150, 200, 300, 500)
NEW_RULE = 1e-3   # the protocol's tol default (mlomae/eval/spec.py)
TOLERANCES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def trajectory(x, y, xv, yv, weight_decay: float, chunk: int = 10, max_iter: int = 500):
    """L-BFGS in chunks of ``chunk`` iterations (its memory kept between chunks); after each,
    (iterations, seconds so far, loss, top-1 on the validation features)."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z, zv = (x - mean) / std, (xv - mean) / std
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=chunk, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    out, t, done = [], 0.0, 0
    while done < max_iter:
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = float(opt.step(closure))
        t += time.perf_counter() - t0
        it = opt.state[opt._params[0]]["n_iter"]
        with torch.no_grad():
            acc = 100.0 * float(((zv @ w + b).argmax(1) == yv).float().mean())
        out.append((it, t, loss, acc))
        if it == done:   # converged inside the chunk: L-BFGS's own tolerances
            break
        done = it
    return out


def read_rule(traj, kind: str, value: float):
    """The point of ``traj`` where the rule stops: an iteration cap, or the relative decrease
    of the loss over the last chunk below a tolerance."""
    for i, (it, t, loss, acc) in enumerate(traj):
        if kind == "cap" and it >= value:
            return traj[i]
        if kind == "tol" and i and (traj[i - 1][2] - loss) / max(abs(loss), 1e-12) < value:
            return traj[i]
    return traj[-1]


def features(run: str | None):
    """{name: (x_finetune, y, x_mask, y)}: raw pixels, and the run's features if given."""
    from mlomae.build import build
    from mlomae.config import load
    from mlomae.eval import role_features
    from mlomae.eval.features import default_model, role_items
    out = {}
    cfg = load(common.ROOT.parent / "experiments" / "mae_random.yaml", ["trainer.steps=1", "evaluation=[]"])
    b = build(cfg)
    tr = role_features(b, "pixels", None, "finetune", "mean", 512, role_items(b, "finetune"))
    va = role_features(b, "pixels", None, "mask", "mean", 512, role_items(b, "mask"))
    out["raw pixels"] = (*tr, *va)
    if run:
        from mlomae.eval.rundir import load_run
        _, b, _ = load_run(run)
        name = default_model(b)
        m = b.models[name]
        tr = role_features(b, name, m, "finetune", "mean", 512, role_items(b, "finetune"))
        va = role_features(b, name, m, "mask", "mean", 512, role_items(b, "mask"))
        out[f"features of {run.rstrip('/').rsplit('/', 1)[-1]}"] = (*tr, *va)
    return out


def main() -> None:
    p = common.parser(__doc__, repeats=1, quick_repeats=1)
    p.add_argument("--run", default=None, help="a finished run whose encoder's features to probe")
    p.add_argument("--weight-decays", default=None,
                   help="default 1e-5,1e-4,1e-3 (--quick: the protocol's default 1e-4)")
    args = p.parse_args()
    args.weight_decays = args.weight_decays or ("1e-4" if args.quick else "1e-5,1e-4,1e-3")
    common.setup(args)
    print(common.describe_machine(args.threads))
    rows, results, headlines = [], {}, []
    for name, (x, y, xv, yv) in features(args.run).items():
        for wd in [float(v) for v in args.weight_decays.split(",")]:
            traj = trajectory(x.float(), y, xv.float(), yv, wd)
            ref = read_rule(traj, "cap", 500)
            results[f"{name} wd={wd:g}"] = traj
            rules = [("cap", c) for c in CHECKPOINTS] + [("tol", t) for t in TOLERANCES]
            for kind, v in rules:
                it, t, loss, acc = read_rule(traj, kind, v)
                rows.append([name, f"{wd:g}", f"{kind} {v:g}", it, t, ref[1] / t, acc, acc - ref[3]])
            print(f"  {name}, weight decay {wd:g}: 500 iterations {ref[1]:.1f} s, top-1 on mask "
                  f"{ref[3]:.2f}", flush=True)
            new = read_rule(traj, "tol", NEW_RULE)
            headlines.append(f"HEADLINE linear-probe {name} (weight decay {wd:g}): 500 iterations / "
                             f"tol {NEW_RULE:g} = {ref[1] / new[1]:.2f}x faster, top-1 on mask "
                             f"{new[3] - ref[3]:+.2f} points (goal >= 3x within 0.1)")
    print(common.table(rows, ["features", "weight decay", "rule", "iterations", "s",
                              "× faster than 500", "top-1 on mask", "vs 500"]))
    print("\n".join(headlines))
    common.save("linear_probe", {"trajectories": results}, args)


if __name__ == "__main__":
    main()
