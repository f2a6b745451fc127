"""The masker's other paths (adversarial, reconstruction feedback) and the discriminator level,
on the tiny float64 graph. References: closed forms of the LSGAN gradients through a linear
discriminator, central finite differences, and step counts of the schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import Const
from mlomae.engine import Callback, Dependency, Engine
from mlomae.models.discriminator import MaskDiscriminator
from mlomae.models.masking import num_masked
from problems.discriminator import Discriminator
from problems.mask import MaskLearning
from problems.pretrain import Reconstruction
from test_problems_tiny import DT, IMG, PATCH, L, LinearScorer, batches, mlo_graph, tiny_mae
from test_problems_tiny import one_thread  # noqa: F401  (an autouse fixture)

GRID = (IMG // PATCH, IMG // PATCH)
K_MASKED = num_masked(L, 0.75)                     # 7 of 9 patches


class FreeLogits(nn.Module):
    """A masker whose patch logits are its parameters, the same for every image."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(init.clone().to(DT))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


def generator_graph(masking: str, w: torch.Tensor, init: torch.Tensor, lr: float = 1.0):
    """pretrain (fixed MAE) / mask (adversarial term only, SGD) / disc (a fixed linear scorer)."""
    mae, gen = tiny_mae(), FreeLogits(init)
    (xp, yp), _, _ = batches()
    pre = Reconstruction("pretrain", mae, data=Const((xp, yp)), reads=["mask"], masking=masking,
                         learned_fraction=1.0, tau=0.5)
    mk = MaskLearning("mask", gen, optimizer=torch.optim.SGD(gen.parameters(), lr=lr),
                      data=Const((xp, yp)), reads=["pretrain", "disc"],
                      losses={"downstream": 0.0, "adversarial": 1.0})
    disc = Discriminator("disc", LinearScorer(w, trainable=False), data=Const((xp, yp)),
                         reads=["mask"])
    deps = [Dependency("mask", "pretrain", "first_order"), Dependency("mask", "disc", "first_order")]
    return Engine([pre, mk, disc], deps), gen


# "Real" masks in this toy lie in the left two columns of the 3x3 grid: the scorer rewards them.
REAL = torch.tensor([1, 1, 0] * 3, dtype=DT)                       # 6 patches
W = 2 * REAL - 1                                                   # +1 inside, -1 outside
INIT = torch.linspace(1.0, -1.0, L, dtype=DT).flip(0) * 0.3        # favours the right column


def overlap(gen: FreeLogits) -> int:
    """Masked patches inside the real region, for the generator's deterministic top-k."""
    top = torch.topk(gen.value.detach(), K_MASKED).indices
    return int(REAL[top].sum())


def test_adversarial_gradient_is_the_closed_form_and_points_to_real_masks():
    """mlo mode: learned_mask = topk + sigmoid(l) - sigmoid(l).detach(), D(m) = w.m / L, so
    d/dl_i [0.5 mean (D - 1)^2] = (D - 1) w_i sigmoid'(l_i) / L exactly; its sign is -w_i
    (D < 1): gradient descent raises the logits inside the real region. Trained for 60 steps the
    masks move there: 7 masked patches, 6 inside the region, so 6 is the most possible."""
    eng, gen = generator_graph("mlo", W, INIT)
    _, direct, hyper = eng.gradient("mask")
    s = torch.sigmoid(INIT)
    top = torch.topk(INIT, K_MASKED).indices
    m = torch.zeros(L, dtype=DT).index_fill_(0, top, 1.0)
    D = float((W * m).sum() / L)
    expected = (D - 1) * W * s * (1 - s) / L
    assert D < 1
    assert torch.allclose(direct[0], expected, rtol=1e-12, atol=1e-15)
    assert float(hyper[0].abs().max()) == 0.0                     # first_order edges: nothing
    assert torch.equal(torch.sign(direct[0]), -torch.sign(W))
    start = overlap(gen)
    eng.run(60)
    assert start < 6 and overlap(gen) == 6


def test_adversarial_term_moves_gumbel_masks_to_real_ones():
    """gumbel mode (the generator picks every masked slot, tau 0.5): the same scorer pulls the
    generator's masks into the real region (overlap 6, the most possible, from fewer)."""
    torch.manual_seed(0)
    eng, gen = generator_graph("gumbel", W, INIT, lr=2.0)
    start = overlap(gen)
    eng.run(150)
    assert start < 6 and overlap(gen) == 6


def test_discriminator_gradient_is_the_lsgan_closed_form():
    """Linear D(m) = w.m / L at w = 0: d/dw [0.5 mean (D(r) - 1)^2 + 0.5 mean D(f)^2]
    = -mean(r) / L, for the very real masks the problem draws (same seed)."""
    eng, _ = generator_graph("mlo", torch.zeros(L), INIT)
    disc = eng.problems["disc"]
    disc.module.w.requires_grad_(True)
    x = batches()[0][0]
    torch.manual_seed(11)
    fake, real = disc.fake_and_real(x)
    assert fake.shape == (x.shape[0], L) and real.shape == (x.shape[0], *GRID)
    assert torch.all(real.flatten(1).sum(1) == K_MASKED)          # the generator's count
    torch.manual_seed(11)
    _, direct, _ = eng.gradient("disc")
    assert torch.allclose(direct[0], -real.flatten(1).mean(0) / L, rtol=1e-12, atol=1e-15)


def test_discriminator_and_generator_alternate_as_configured():
    """AutoMAE's graph with 3 discriminator steps per generator step: over 4 outer steps the
    schedule runs 12 discriminator and 4 generator steps, exactly 3 discriminator steps before
    each generator step, and each level's parameters change only in its own steps."""
    mae = tiny_mae()
    torch.manual_seed(5)
    gen = FreeLogits(torch.randn(L))
    disc_net = MaskDiscriminator(GRID, channels=(4, 4)).to(DT)
    (xp, yp), _, _ = batches()
    data = Const((xp, yp))
    pre = Reconstruction("pretrain", mae, optimizer=torch.optim.SGD(mae.parameters(), lr=0.01),
                         data=data, reads=["mask"], masking="gumbel")
    mk = MaskLearning("mask", gen, optimizer=torch.optim.SGD(gen.parameters(), lr=0.1), data=data,
                      reads=["pretrain", "disc"],
                      losses={"downstream": 0, "adversarial": 0.2, "reconstruction": 1.0})
    dc = Discriminator("disc", disc_net, optimizer=torch.optim.SGD(disc_net.parameters(), lr=0.1),
                       data=data, steps=3, reads=["mask"])
    eng = Engine([pre, mk, dc], [Dependency("mask", "pretrain", "first_order"),
                                 Dependency("mask", "disc", "first_order")])

    class Watch(Callback):
        def __init__(self):
            self.changed = []
            self.snap = self.state()

        def state(self):
            return {n: [p.detach().clone() for p in m.parameters()]
                    for n, m in (("mask", gen), ("disc", disc_net))}

        def on_problem_step(self, engine, record):
            now = self.state()
            moved = {n for n in now if any(not torch.equal(a, b) for a, b in zip(now[n], self.snap[n]))}
            self.changed.append((record.problem, moved))
            self.snap = now

    watch = Watch()
    eng.callbacks = [watch]
    eng.run(4)
    order = [p for p, _ in watch.changed]
    assert eng.problems["disc"].step_count == 12 and eng.problems["mask"].step_count == 4
    runs = "".join("d" if p == "disc" else "g" if p == "mask" else "" for p in order)
    assert runs == "dddg" * 4
    for problem, moved in watch.changed:
        assert moved <= ({problem} & {"mask", "disc"})           # nobody else's parameters move
        if problem in ("mask", "disc"):
            assert moved == {problem}


def test_reconstruction_feedback_gradient_is_the_finite_difference():
    """mlo mode, losses {reconstruction: 1}: the masker's direct gradient is d/dT of the
    probability-weighted masked loss with the selection fixed; central differences along three
    random directions agree to 1e-7 (the top-k does not change at eps = 1e-6)."""
    eng, mods = mlo_graph("darts", K=1, losses={"downstream": 0.0, "reconstruction": 1.0})
    mk, masker = eng.problems["mask"], mods["masker"]
    batch = mk.next_batch()
    params = list(masker.parameters())
    loss = mk.loss(batch)[0]
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(3)
    saved = [p.detach().clone() for p in params]
    sel = mk.generate(batch[0]).mask
    for _ in range(3):
        d = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
        vals = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s, di in zip(params, saved, d):
                    p.copy_(s + sign * 1e-6 * di)
            assert torch.equal(mk.generate(batch[0]).mask, sel)
            with torch.no_grad():
                vals.append(float(mk.loss(batch)[0]))
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        fd = (vals[0] - vals[1]) / 2e-6
        an = float(sum((gi * di).sum() for gi, di in zip(grads, d)))
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an))


def test_loss_terms_add_up_through_every_path():
    """The combination graph (downstream hypergradient + adversarial + reconstruction on one
    masker): the masker's gradient with all three weights equals the sum of the three gradients
    computed alone from the same state, and each of the three is non-zero."""
    def grad(losses):
        torch.manual_seed(0)
        w = torch.linspace(-1, 1, L)
        eng, _ = mlo_graph("unroll", K=1, losses=losses, disc=LinearScorer(w, trainable=False))
        eng.prefix("mask")
        _, direct, hyper = eng.gradient("mask")
        return torch.cat([(a + b).reshape(-1) for a, b in zip(direct, hyper)])

    parts = [grad({"downstream": 1.0}), grad({"downstream": 0.0, "adversarial": 0.2}),
             grad({"downstream": 0.0, "reconstruction": 0.5})]
    for p in parts:
        assert float(p.norm()) > 1e-8
    both = grad({"downstream": 1.0, "adversarial": 0.2, "reconstruction": 0.5})
    assert torch.allclose(both, sum(parts), rtol=1e-9, atol=1e-13)


def test_mask_learning_checks_its_reads_and_weights():
    mae, gen = tiny_mae(), FreeLogits(torch.zeros(L))
    with pytest.raises(ValueError, match="reads 'disc'"):
        MaskLearning("mask", gen, reads=["pretrain"], losses={"downstream": 0, "adversarial": 1})
    with pytest.raises(ValueError, match="reads 'finetune'"):
        MaskLearning("mask", gen, reads=["pretrain"])
    with pytest.raises(ValueError, match="unknown loss term 'adverserial'"):
        MaskLearning("mask", gen, reads=["pretrain", "disc"], losses={"adverserial": 1})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        MaskLearning("mask", gen, reads=["pretrain"], losses={"downstream": 0})
    with pytest.raises(ValueError, match="reads the masks of problem 'mask'"):
        Discriminator("disc", LinearScorer(torch.zeros(L)), reads=[])
    pre = Reconstruction("pretrain", mae, masking="random")
    mk = MaskLearning("mask", gen, reads=["pretrain"], losses={"downstream": 0, "reconstruction": 1})
    mk._peers = {"pretrain": pre}
    with pytest.raises(ValueError, match="masks with 'random'"):
        mk.generate(torch.zeros(2, 1, IMG, IMG, dtype=DT))
