"""Masking modes: exact counts, MAE equivalence, top-k, straight-through gradients, object prior."""

from __future__ import annotations

import itertools

import pytest
import torch

from mlomae.models.masking import (
    Masking, foreground_boxes, box_patches, gumbel_topk_masking, masking_from_hard, num_learned,
    num_masked, object_prior_masking, prob_topk_masking, random_masking, random_rect_masks,
    score_masking,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _all_modes(N: int, L: int, ratio: float) -> dict[str, Masking]:
    g = _gen(N * 1000 + L)
    side = int(L ** 0.5)
    boxes = torch.tensor([[0.0, 0.0, 2 * side, 2 * side]]).repeat(N, 1)   # patch 4, half the grid
    return {
        "random": random_masking(N, L, ratio, "cpu", generator=g),
        "score": score_masking(torch.rand(N, L, generator=g), ratio),
        "prob": prob_topk_masking(torch.rand(N, L, generator=g), ratio),
        "gumbel": gumbel_topk_masking(torch.randn(N, L, generator=g), ratio, 0.5, 1 / 3, g),
        "object": object_prior_masking(boxes, (side, side), 4, ratio, 0.5, g),
    }


def test_num_masked_follows_mae_rounding():
    """Expected counts from MAE's rule len_keep = int(L * (1 - ratio)): 196 * 0.25 = 49 kept,
    49 * 0.25 = 12.25 -> 12 kept (37 masked); 10 * (1 - 0.9) is 0.999... in float, guarded to 1."""
    assert num_masked(196, 0.75) == 147
    assert num_masked(49, 0.75) == 37
    assert num_masked(64, 0.75) == 48
    assert num_masked(10, 0.9) == 9
    assert num_masked(4, 0.5) == 2
    assert num_masked(196, torch.tensor(0.75)) == 147   # 0-d tensors (and numpy scalars) work


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, None, "0.75", True])
def test_num_masked_rejects_ratio_outside_open_interval(bad):
    """The brief: a ratio outside (0, 1) raises ValueError naming the value."""
    with pytest.raises(ValueError, match=repr(bad)):
        num_masked(49, bad)


def test_num_masked_rejects_ratio_leaving_no_visible_patch():
    """L=4, ratio 0.99: int(4 * 0.01) = 0 visible patches, nothing for the encoder."""
    with pytest.raises(ValueError, match="0 of 4"):
        num_masked(4, 0.99)


@pytest.mark.parametrize("N,L,ratio", [(1, 16, 0.75), (3, 49, 0.75), (5, 16, 0.5),
                                       (8, 64, 0.25), (2, 49, 0.6)])
def test_every_mode_masks_exactly_k_and_restores(N, L, ratio):
    """Count = num_masked(L, ratio) in every row; ids_keep are exactly the zeros of mask; gathering
    cat(visible ids, -1s) with ids_restore puts each patch back at its index (what the decoder does)."""
    k = num_masked(L, ratio)
    for name, m in _all_modes(N, L, ratio).items():
        mask = m.mask.detach()
        assert mask.shape == (N, L), name
        assert set(mask.unique().tolist()) <= {0.0, 1.0}, name
        assert torch.equal(mask.sum(1), torch.full((N,), float(k))), name
        assert m.ids_keep.shape == (N, L - k) and m.num_masked == k, name
        assert torch.all(mask.gather(1, m.ids_keep) == 0), name
        ids = torch.arange(L).expand(N, L)
        shuffled = torch.cat([ids.gather(1, m.ids_keep), torch.full((N, k), -1)], dim=1)
        restored = shuffled.gather(1, m.ids_restore)
        assert torch.equal(restored, torch.where(mask.bool(), -1, ids)), name


def test_random_masking_equals_mae_argsort_of_noise():
    """Reference: MAE's random_masking (facebookresearch/mae models_mae.py), written out here."""
    N, L, ratio = 4, 49, 0.75
    noise = torch.rand(N, L, generator=_gen(1))
    len_keep = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)

    m = random_masking(N, L, ratio, "cpu", noise=noise)
    assert torch.equal(m.ids_keep, ids_keep)
    assert torch.equal(m.ids_restore, ids_restore)
    assert torch.equal(m.mask, mask)
    assert m.weights is None
    # a seeded generator draws the same noise
    assert torch.equal(random_masking(N, L, ratio, "cpu", generator=_gen(1)).mask, mask)


def test_score_masking_picks_topk_with_index_tiebreak():
    """Hand cases: [0.1, 0.9, 0.5, 0.9], k=2 -> {1, 3}; all equal, k=2 -> lowest indices {0, 1}.
    Random rows: the masked set equals Python's sorted(range(L), key=-score)[:k]."""
    m = score_masking(torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.5, 0.5, 0.5, 0.5]]), 0.5)
    assert m.mask.tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]
    assert m.ids_keep.tolist() == [[0, 2], [2, 3]]        # ascending
    scores = torch.rand(6, 49, generator=_gen(2))
    m = score_masking(scores, 0.75)
    for row, s in zip(m.mask, scores.tolist()):
        top = sorted(range(49), key=lambda i: (-s[i], i))[:37]
        assert sorted(torch.nonzero(row).flatten().tolist()) == sorted(top)


def test_prob_topk_weights_are_the_probabilities():
    """MLO-MAE: weights is the masker's probability tensor itself, gradient kept."""
    probs = torch.rand(3, 16, generator=_gen(3)).requires_grad_()
    m = prob_topk_masking(probs, 0.75)
    assert m.weights is probs
    assert not m.mask.requires_grad
    assert torch.equal(m.mask, score_masking(probs, 0.75).mask)


def test_prob_topk_normalized_weights_are_blind_to_a_common_scale():
    """weighting: normalized. The masked weights average 1 per image, the weighted loss is
    sum(p l) / sum(p) over each image's masked patches (hand formula), and its derivative in a
    common factor c of all probabilities is 0 (float64, to rounding)."""
    from mlomae.models.mae import MaskedAutoencoder
    g = _gen(4)
    probs = torch.rand(3, 16, generator=g, dtype=torch.float64) * 0.8 + 0.1
    per_patch = torch.rand(3, 16, generator=g, dtype=torch.float64)
    c = torch.ones((), dtype=torch.float64, requires_grad=True)
    m = prob_topk_masking(probs * c, 0.75, normalize=True)
    assert m.probs is not None and torch.equal(m.probs.detach(), probs)
    w = (m.weights * m.mask).detach()
    assert torch.allclose(w.sum(1) / m.mask.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-15)
    loss = MaskedAutoencoder.masked_loss(None, per_patch, m)
    by_hand = sum((probs[i] * per_patch[i] * m.mask[i]).sum() / (probs[i] * m.mask[i]).sum()
                  for i in range(3)) / 3
    assert abs(float(loss) - float(by_hand)) < 1e-14
    (dc,) = torch.autograd.grad(loss, c)
    assert abs(float(dc)) < 1e-14
    # the plain MLO-MAE weights are not: there d loss / d c is the loss itself at c = 1
    plain = MaskedAutoencoder.masked_loss(None, per_patch, prob_topk_masking(probs * c, 0.75))
    (dc,) = torch.autograd.grad(plain, c)
    assert abs(float(dc) - float(plain)) < 1e-14


def test_gumbel_learned_slots_are_topk_of_perturbed_logits():
    """AutoMAE: 1/3 of the 147 masked slots at L=196 (75%) is 49 = 25% of patches from the
    generator. Those are the top-49 of logits + g; the rest lie outside them."""
    assert num_learned(196, 0.75, 1 / 3) == 49
    N, L = 4, 196
    logits = torch.randn(N, L, generator=_gen(4))
    g = -torch.log(-torch.log(torch.rand(N, L, generator=_gen(5))))
    m = gumbel_topk_masking(logits, 0.75, 1.0, 1 / 3, generator=_gen(6), gumbel=g)
    learned = m.learned_mask.detach()
    top49 = torch.zeros(N, L).scatter_(1, torch.topk(logits + g, 49, dim=1).indices, 1.0)
    assert torch.equal(learned, top49)
    assert torch.equal(learned.sum(1), torch.full((N,), 49.0))
    assert torch.all(m.mask.detach() >= learned)
    # learned_fraction 1: the whole mask is the top-k of the perturbed logits
    full = gumbel_topk_masking(logits, 0.75, 1.0, 1.0, gumbel=g)
    assert torch.equal(full.mask.detach(), score_masking(logits + g, 0.75).mask)


@pytest.mark.parametrize("learned_fraction", [1 / 3, 1.0])
def test_gumbel_straight_through_gradient_is_softmax_jacobian(learned_fraction):
    """Closed form: with soft = softmax((l + g) / tau) and loss = sum_i c_i mask_i, the ST
    gradient is (1/tau) soft_j (c_j - sum_i soft_i c_i). Forward values are exactly 0/1."""
    N, L, tau = 3, 16, 0.7
    logits = torch.randn(N, L, dtype=torch.float64, generator=_gen(7)).requires_grad_()
    g = -torch.log(-torch.log(torch.rand(N, L, dtype=torch.float64, generator=_gen(8))))
    c = torch.rand(N, L, dtype=torch.float64, generator=_gen(9))
    m = gumbel_topk_masking(logits, 0.75, tau, learned_fraction, generator=_gen(10), gumbel=g)
    assert set(m.mask.detach().unique().tolist()) == {0.0, 1.0}
    (grad,) = torch.autograd.grad((c * m.mask).sum(), logits)
    soft = torch.softmax((logits.detach() + g) / tau, dim=1)
    expected = soft * (c - (soft * c).sum(1, keepdim=True)) / tau
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_box_patches_overlap_rule():
    """Hand-computed: 4x4 grid of 4-px patches, box x in [3, 9), y in [4, 5): columns 0..2
    (pixels 0-3, 4-7, 8-11 meet [3, 9)), row 1 only (pixels 4-7 meet [4, 5))."""
    inside = box_patches(torch.tensor([[3.0, 4.0, 9.0, 5.0]]), (4, 4), 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 0:3] = True
    assert torch.equal(inside, expected)


def _inclusion_top2(w: list[float]) -> list[float]:
    """Exact P(i among 2 draws without replacement, probability proportional to w)."""
    W = sum(w)
    return [w[i] / W + sum(w[j] / W * w[i] / (W - w[j]) for j in range(len(w)) if j != i)
            for i in range(len(w))]


@pytest.mark.parametrize("ratio,expected", [
    (0.25, [2 / 5, 1 / 5, 1 / 5, 1 / 5]),     # k=1: P(i) = w_i / sum w, w = (2, 1, 1, 1)
    (0.5, _inclusion_top2([2.0, 1.0, 1.0, 1.0])),  # k=2: 0.7, 0.4333.. each (sums to 2)
])
def test_object_prior_inclusion_frequency(ratio, expected):
    """L=4 (2x2 grid of 2-px patches), box over patch 0 only, beta=1 -> weights (2, 1, 1, 1).
    Empirical frequency over 40000 draws within 5 standard errors (<= 0.0125) of the exact value."""
    n = 40000
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(n, 1)
    m = object_prior_masking(boxes, (2, 2), 2, ratio, beta=1.0, generator=_gen(11))
    freq = m.mask.mean(0)
    expected = torch.tensor(expected)
    se = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() < 5 * se), (freq, expected)


def test_foreground_boxes_hand_made_images():
    """Image 0: zeros with a block of 1s at rows 2..4, cols 3..6 -> box (3, 2, 7, 5).
    Image 1: background 0.7 (border median), one pixel 0.1 at (row 6, col 1) -> (1, 6, 2, 7).
    Image 2: constant -> no foreground -> full image (0, 0, 8, 8)."""
    imgs = torch.zeros(3, 1, 8, 8)
    imgs[0, 0, 2:5, 3:7] = 1.0
    imgs[1] = 0.7
    imgs[1, 0, 6, 1] = 0.1
    imgs[2] = 0.3
    boxes = foreground_boxes(imgs, threshold=0.2)
    assert boxes.tolist() == [[3, 2, 7, 5], [1, 6, 2, 7], [0, 0, 8, 8]]
    # against a zero background the constant images are foreground everywhere
    assert foreground_boxes(imgs, 0.2, background="zero")[1:].tolist() == [[0, 0, 8, 8]] * 2


@pytest.mark.parametrize("N,grid,ratio", list(itertools.product([1, 7], [(7, 7), (4, 6)],
                                                                  [0.25, 0.75])))
def test_random_rect_masks_exact_count(N, grid, ratio):
    """Exactly num_masked(gh * gw, ratio) ones per sample, values 0/1, shape [N, gh, gw]."""
    masks = random_rect_masks(N, grid, ratio, generator=_gen(12))
    k = num_masked(grid[0] * grid[1], ratio)
    assert masks.shape == (N, *grid)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.flatten(1).sum(1), torch.full((N,), float(k)))
    counts = random_rect_masks(N, grid, None, count=5, generator=_gen(13)).flatten(1).sum(1)
    assert torch.equal(counts, torch.full((N,), 5.0))


def test_random_rect_masks_square_when_area_fits():
    """Aspect fixed at 1, k=4 on a 4x4 grid: h = w = round(sqrt(4)) = 2, so the mask is one
    2x2 block with no top-up."""
    masks = random_rect_masks(20, (4, 4), None, count=4, aspect=(1.0, 1.0), generator=_gen(14))
    for m in masks:
        rows, cols = torch.nonzero(m, as_tuple=True)
        assert rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1


def test_masking_from_hard_rejects_uneven_counts():
    """The encoder batches one L_keep for all samples: rows must agree."""
    with pytest.raises(ValueError, match="counts"):
        masking_from_hard(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
