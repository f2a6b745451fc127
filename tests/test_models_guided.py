"""Self-guided masks: the pixel-spread score, sampling by a score with a random share, throwing,
and the guided mode's warm-up, on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mlomae.models.masking import guided_masking, num_thrown, patch_spread, random_masking


def test_patch_spread_by_hand():
    """2x2 patches of a 4x4 image: constant (0), a checkerboard of 0 and 1 (std 0.5), a ramp
    0,1,2,3 (std sqrt(1.25)), one bright pixel of 4 (std sqrt(3))."""
    img = torch.tensor([[7., 7., 0., 1.],
                        [7., 7., 1., 0.],
                        [0., 1., 4., 0.],
                        [2., 3., 0., 0.]]).reshape(1, 1, 4, 4)
    torch.testing.assert_close(patch_spread(img, 2), torch.tensor([[0.0, 0.5, math.sqrt(1.25), math.sqrt(3.0)]]))


def test_guided_masks_are_exact_counts_and_respect_the_scores():
    """random_share 0: only the positive-score patches are masked while there are enough of
    them; thrown patches (the lowest scores, ties to the lower index) are neither visible nor
    masked; the counts are MAE's over the patches kept."""
    scores = torch.tensor([[0., 0., 3., 2., 0., 5., 1., 0., 4., 0.]]).repeat(4, 1)
    m = guided_masking(scores, 0.5, random_share=0.0, throw=0.2, generator=torch.Generator().manual_seed(0))
    thrown = torch.zeros(4, 10)
    thrown[:, [0, 1]] = 1                                  # two lowest, lower index first
    masked_count = 4                                       # num_masked(8, 0.5)
    assert torch.equal(m.mask.sum(1), torch.full((4,), float(masked_count)))
    assert m.ids_keep.shape == (4, 8 - masked_count)
    visible = torch.zeros(4, 10).scatter(1, m.ids_keep, 1.0)
    assert torch.equal(visible + m.mask + thrown, torch.ones(4, 10))
    # 4 of the 5 positive patches are drawn; a zero-score patch is never masked
    assert torch.all(m.mask[:, [4, 7, 9]] == 0)
    # ids_restore inverts the encoder's order (visible, masked, thrown)
    order = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(order[:, :4], m.ids_keep)


def test_guided_draw_is_proportional_to_the_score():
    """k = 1 of L = 4 (ratio 0.25 of 4 keeps 3): P(i masked) = s_i^(1/T) / sum_j s_j^(1/T);
    20000 draws land within 4 standard deviations of it, for T = 1 and T = 0.5."""
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    n = 20000
    g = torch.Generator().manual_seed(1)
    for t in (1.0, 0.5):
        m = guided_masking(s.repeat(n, 1), 0.25, random_share=0.0, temperature=t, generator=g)
        freq = m.mask.mean(0)
        p = s ** (1 / t) / (s ** (1 / t)).sum()
        assert torch.all((freq - p).abs() < 4 * torch.sqrt(p * (1 - p) / n)), (t, freq, p)


def test_random_share_one_is_uniform_and_throw_bounds():
    """random_share 1 ignores the score (the mask frequency of a zero-score patch is the
    uniform k/L); num_thrown floors and refuses to leave fewer than two patches."""
    n, g = 20000, torch.Generator().manual_seed(2)
    scores = torch.tensor([[0.0, 1.0, 1.0, 5.0]]).repeat(n, 1)
    freq = guided_masking(scores, 0.5, random_share=1.0, generator=g).mask.mean(0)
    assert torch.all((freq - 0.5).abs() < 4 * math.sqrt(0.25 / n))
    assert [num_thrown(49, t) for t in (0.0, 0.1, 0.2, 0.5)] == [0, 4, 9, 24]
    with pytest.raises(ValueError, match="leaves 1 of 4"):
        num_thrown(4, 0.8)


def test_guided_mode_warms_up_with_random_masks():
    from problems.pretrain import Reconstruction
    from test_problems_tiny import tiny_mae
    p = Reconstruction("pretrain", tiny_mae(), masking="guided", warmup_steps=2)
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    torch.manual_seed(5)
    warm = p.masking_for(x)
    torch.manual_seed(5)
    ref = random_masking(3, p.module.num_patches, 0.75)
    assert torch.equal(warm.mask, ref.mask) and torch.equal(warm.ids_keep, ref.ids_keep)
    p.step_count = 2
    torch.manual_seed(5)
    assert not torch.equal(p.masking_for(x).ids_keep, ref.ids_keep)
    with pytest.raises(ValueError, match="throw applies"):
        Reconstruction("pretrain", tiny_mae(), masking="object_prior", throw=0.2)


def test_block_mode_masks_one_rectangle_of_exactly_k_patches():
    """masking: block gives exactly num_masked(49, 0.75) = 37 masked patches per image, and
    (k = 37 fits a rectangle up to the count correction) most of them in one rectangle: every
    image's masked patches span at most the grid and are not a uniform scatter."""
    from problems.pretrain import Reconstruction
    from mlomae.models.mae import MaskedAutoencoder
    p = Reconstruction("pretrain", MaskedAutoencoder(28, 4, 1, 16, 1, 2, 16, 1, 2), masking="block")
    torch.manual_seed(0)
    m = p.masking_for(torch.zeros(64, 1, 28, 28))
    assert torch.equal(m.mask.sum(1), torch.full((64,), 37.0)) and m.ids_keep.shape == (64, 12)
    # a random rectangle + correction keeps masked patches together: far fewer masked/visible
    # neighbour pairs than a uniform mask (expected 84 * 2 * (37/49)(12/49) = 31 of 84)
    grid = m.mask.view(64, 7, 7)
    edges = (grid[:, 1:] != grid[:, :-1]).sum((1, 2)) + (grid[:, :, 1:] != grid[:, :, :-1]).sum((1, 2))
    assert float(edges.float().mean()) < 0.7 * 84 * 2 * (37 / 49) * (12 / 49)


def test_ranking_loss_by_hand():
    """One image, masked patches 1 and 3 (targets 0.2 and 0.5, predictions 0.0 and 1.0): the
    ordered pairs are (1, 3) with label 0 and (3, 1) with label 1, both with logit ∓1, so the
    loss is the mean of -log(1 - σ(-1)) and -log σ(1) = log(1 + e^-1)."""
    from mlomae.models.masking import masking_from_hard
    from problems.pretrain import ranking_loss
    m = masking_from_hard(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    pred = torch.tensor([[9.0, 0.0, -9.0, 1.0]])       # visible patches must not matter
    target = torch.tensor([[5.0, 0.2, 7.0, 0.5]])
    assert math.isclose(float(ranking_loss(pred, target, m)), math.log1p(math.exp(-1.0)), rel_tol=1e-6)


def test_hpm_mode_takes_the_highest_predicted_patches_after_its_ramp():
    """temperature 0, random_share 0: past ramp_steps every masked patch is among the
    highest-predicted; at step 0 of the ramp the share is 0 and the masks are uniform."""
    from mlomae.models.mae import MaskedAutoencoder
    from problems.pretrain import Reconstruction
    torch.manual_seed(0)
    mae = MaskedAutoencoder(28, 4, 1, 16, 1, 2, 16, 1, 2, loss_predictor=True)
    p = Reconstruction("pretrain", mae, masking="guided", score="predicted_loss", temperature=0.0,
                       random_share=0.0, ramp_steps=10)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        pred = mae.predict_patch_loss(x)
    p.step_count = 10
    top = torch.zeros(4, 49).scatter(1, pred.topk(37, dim=1).indices, 1.0)
    assert torch.equal(p.masking_for(x).mask, top)
    p.step_count = 0
    torch.manual_seed(3)
    got = p.masking_for(x)
    torch.manual_seed(3)
    ref = guided_masking(pred, 0.75, random_share=1.0, temperature=0.0)
    assert torch.equal(got.mask, ref.mask)
    with pytest.raises(ValueError, match="loss predictor"):
        Reconstruction("pretrain", MaskedAutoencoder(28, 4, 1, 16, 1, 2, 16, 1, 2),
                       masking="guided", score="predicted_loss")


def test_mlo_sampled_selection_logit_clip_and_warm_up():
    """selection sampled: exactly k masked, drawn ∝ exp(logit/T) (a masker whose logits are
    +30 on 37 patches and -30 elsewhere masks exactly those with random_share 0), the weights
    are the (clipped) probabilities of the masked patches with their gradient, and the first
    warmup_steps steps use random masks."""
    from torch import nn
    from problems.pretrain import MaskingSpec, Reconstruction
    from test_problems_tiny import tiny_mae

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.value = nn.Parameter(logits)

        def logits(self, x):
            return self.value.expand(x.shape[0], -1)

    from mlomae.models.masking import num_masked
    mae = tiny_mae()
    L = mae.num_patches
    k = num_masked(L, 0.75)                                      # 9 patches, 7 masked
    chosen = torch.zeros(L, dtype=torch.float64)
    chosen[:k] = 1
    masker = Fixed(torch.where(chosen.bool(), 30.0, -30.0).to(torch.float64))
    x = torch.randn(5, 1, 12, 12, dtype=torch.float64)
    spec = MaskingSpec("mlo", selection="sampled", random_share=0.0, logit_clip=3.0)
    m = spec.make(x, mae, masker)
    assert torch.equal(m.mask, chosen.repeat(5, 1).to(m.mask.dtype))
    torch.testing.assert_close(m.weights, torch.sigmoid(3.0 * torch.tanh(masker.value / 3.0)).expand(5, -1))
    assert m.weights.requires_grad
    # random_share 1: uniform whatever the logits (each patch masked k/L of the time)
    torch.manual_seed(0)
    many = MaskingSpec("mlo", selection="sampled", random_share=1.0).make(x.repeat(400, 1, 1, 1), mae, masker)
    q, n = k / L, 2000 * k
    assert abs(float(many.mask[:, :k].mean()) - q) < 4 * (q * (1 - q) / n) ** 0.5
    p = Reconstruction("pretrain", mae, reads=["mask"], masking="mlo", warmup_steps=1)
    p._peers = {"mask": type("Holder", (), {"module": masker})()}
    torch.manual_seed(1)
    warm = p.masking_for(x)
    assert warm.weights is None
    p.step_count = 1
    assert p.masking_for(x).weights is not None


def test_masker_regularisers_by_hand():
    """p = [[0.5, 0.9], [0.1, 0.5]], ratio 0.75: entropy = (2 ln 2 + 2 H(0.9)) / 4; diversity =
    std of each column (0.2 and 0.2); ratio_kl = mean of KL(0.75 || 0.7) and KL(0.75 || 0.3)."""
    from mlomae.models.masking import Masking
    from problems.mask import regularisers
    p = torch.tensor([[0.5, 0.9], [0.1, 0.5]], dtype=torch.float64, requires_grad=True)
    m = Masking(mask=torch.zeros(2, 2), ids_keep=torch.zeros(2, 1, dtype=torch.long),
                ids_restore=torch.zeros(2, 2, dtype=torch.long), probs=p)
    got = regularisers(m, 0.75)

    def h(x):
        return -(x * math.log(x) + (1 - x) * math.log(1 - x))

    def kl(r, q):
        return r * math.log(r / q) + (1 - r) * math.log((1 - r) / (1 - q))
    assert math.isclose(float(got["entropy"]), (2 * math.log(2) + 2 * h(0.9)) / 4, rel_tol=1e-9)
    assert math.isclose(float(got["diversity"]), 0.2, rel_tol=1e-9)
    assert math.isclose(float(got["ratio_kl"]), (kl(0.75, 0.7) + kl(0.75, 0.3)) / 2, rel_tol=1e-9)
    assert torch.autograd.grad(sum(got.values()), p)[0].abs().sum() > 0


def test_warmup_and_ramp_given_as_a_share_of_the_run():
    """A float is a share of the problem's steps in the run: amt.yaml's warm-up 0.1 over 10 outer
    steps of 2 pretraining steps each is round(0.1 * 20) = 2 steps; hpm.yaml's ramp 1.0 is all
    20. Without a runner (no total known) a share is refused with a message; an integer is
    taken as it is."""
    from pathlib import Path

    from mlomae.build import build
    from mlomae.config import load
    from problems.pretrain import Reconstruction
    from test_problems_tiny import tiny_mae
    root = Path(__file__).resolve().parent.parent / "experiments"
    amt = build(load(root / "amt.yaml", ["trainer.steps=10"])).problems["pretrain"]
    assert (amt.total_steps, amt.warmup_steps) == (20, 2)
    hpm = build(load(root / "hpm.yaml", ["trainer.steps=10"])).problems["pretrain"]
    assert (hpm.total_steps, hpm.ramp_steps) == (20, 20)
    p = Reconstruction("pretrain", tiny_mae(), masking="guided", warmup_steps=0.25)
    with pytest.raises(ValueError, match="share of the run"):
        p.warmup_steps
    p.total_steps = 10
    assert p.warmup_steps == 2                   # round(2.5) in Python: banker's rounding
    assert Reconstruction("pretrain", tiny_mae(), masking="guided", warmup_steps=3).warmup_steps == 3
    with pytest.raises(ValueError, match="share of this problem"):
        Reconstruction("pretrain", tiny_mae(), masking="guided", ramp_steps=1.5)


def test_masker_prior_from_pixel_spread_by_hand():
    """prior_weight w adds w · z to the masker's logits, z the image's pixel spread standardised
    over its patches. A 12×12 image of 9 patches, flat except a ±1 checkerboard in patch 0 and a
    ±2 one in patch 4: spread s = (1, 0, 0, 0, 2, 0, 0, 0, 0), mean 1/3, std 2/3, so z = 1 on
    patch 0, 2.5 on patch 4, −0.5 elsewhere; with zero masker logits and w = 2 the probabilities
    are σ(2), σ(5) and σ(−1). A flat image has no prior (z = 0)."""
    from torch import nn
    from problems.pretrain import MaskingSpec, Reconstruction
    from test_problems_tiny import tiny_mae

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.value = nn.Parameter(torch.zeros(9, dtype=torch.float64))

        def logits(self, x):
            return self.value.expand(x.shape[0], -1)

    mae, masker = tiny_mae(), Zero()
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0   # ±1
    x = torch.zeros(2, 1, 12, 12, dtype=torch.float64)
    x[0, 0, 0:4, 0:4] = board
    x[0, 0, 4:8, 4:8] = 2 * board
    spec = MaskingSpec("mlo", selection="sampled", random_share=0.0, prior_weight=2.0)
    m = spec.make(x, mae, masker)
    z = torch.full((9,), -0.5, dtype=torch.float64)
    z[0], z[4] = 1.0, 2.5
    torch.testing.assert_close(m.weights[0], torch.sigmoid(2.0 * z))
    torch.testing.assert_close(m.weights[1], torch.full((9,), 0.5, dtype=torch.float64))
    assert m.weights.requires_grad                 # the path to the masker stays
    with pytest.raises(ValueError, match="prior_weight applies to masking mlo or gumbel"):
        MaskingSpec("random", prior_weight=1.0)
    with pytest.raises(ValueError, match="loss predictor"):
        Reconstruction("pretrain", mae, reads=["mask"], masking="mlo", score="predicted_loss",
                       prior_weight=1.0)


def test_common_mode_share_and_logit_step_by_hand():
    """Rows of the logits' change [3, 1, 1, 1, 1, 1, 1, 1, 1] (L = 9): mean 11/9, squared norm
    17, share 9 (11/9)^2 / 17 = 121/153, RMS sqrt(17/9); a change summing to zero gives 0, a
    constant one 1. The mask level logs nothing on its first call and nothing when the logits
    did not move, and a state round trip logs the same next change."""
    from torch import nn
    from problems.mask import MaskLearning, common_mode_share
    from problems.pretrain import Reconstruction
    from test_problems_tiny import tiny_mae

    assert float(common_mode_share(torch.tensor([[1., -1., 2., -2.]]))) == 0.0
    assert math.isclose(float(common_mode_share(torch.full((2, 4), -0.3))), 1.0, rel_tol=1e-6)

    class Fixed(nn.Module):
        def __init__(self, L):
            super().__init__()
            self.value = nn.Parameter(torch.zeros(L, dtype=torch.float64))

        def logits(self, x):
            return self.value.expand(x.shape[0], -1)

    def level(masker):
        pre = Reconstruction("pretrain", tiny_mae(), reads=["mask"], masking="mlo")
        mk = MaskLearning("mask", masker, reads=["pretrain", "finetune"])
        mk._peers = {"pretrain": pre}
        return mk

    masker = Fixed(9)
    mk = level(masker)
    x = torch.randn(20, 1, 12, 12, dtype=torch.float64)
    assert mk._watch_logits(x) == {}                       # first call: the probe is taken
    assert mk._probe.shape[0] == 16
    assert mk._watch_logits(x[4:]) == {}                   # nothing moved
    with torch.no_grad():
        masker.value += torch.tensor([3., 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    got = mk._watch_logits(torch.randn(8, 1, 12, 12, dtype=torch.float64))   # the probe, not these
    assert math.isclose(float(got["common_mode"]), 121 / 153, rel_tol=1e-6)
    assert math.isclose(float(got["logit_step"]), math.sqrt(17 / 9), rel_tol=1e-6)
    # a resumed level continues from the saved probe and logits
    with torch.no_grad():
        masker.value += torch.tensor([1., -1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    other = level(masker)
    other.load_state_dict(mk.state_dict())
    assert torch.equal(other._probe, mk._probe)
    assert float(other._watch_logits(x)["common_mode"]) == 0.0
    assert float(mk._watch_logits(x)["common_mode"]) == 0.0


def test_mask_agreement_by_hand():
    """L = 4, half masked: two identical masks agree fully (1); complementary ones not at all
    (0); [1,1,0,0] and [1,0,1,0] give per-patch shares [1, .5, .5, 0], mean |share - .5| = .25,
    over 2 * .5 * .5: 0.5. The guided pretraining level logs the same number for its masks."""
    from mlomae.models.masking import mask_agreement
    same = torch.tensor([[1., 1, 0, 0], [1, 1, 0, 0]])
    assert float(mask_agreement(same)) == 1.0
    assert float(mask_agreement(torch.tensor([[1., 1, 0, 0], [0, 0, 1, 1]]))) == 0.0
    assert float(mask_agreement(torch.tensor([[1., 1, 0, 0], [1, 0, 1, 0]]))) == 0.5
    from problems.pretrain import Reconstruction
    from test_problems_tiny import tiny_mae
    p = Reconstruction("pretrain", tiny_mae(), masking="guided", score="pixel_spread")
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    torch.manual_seed(3)
    _, logs = p.loss(x)
    torch.manual_seed(3)
    assert float(logs["mask_agreement"]) == float(mask_agreement(p.masking_for(x).mask))
    assert "mask_agreement" not in Reconstruction("pretrain", tiny_mae()).loss(x)[1]
