"""Mask discriminator: LSGAN losses on given numbers, spectral normalisation, input shapes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from mlomae.models.discriminator import MaskDiscriminator, lsgan_d_loss, lsgan_g_loss


def test_lsgan_losses_on_given_numbers():
    """Hand-computed from the LSGAN formulas (Mao et al. 2017, a=0, b=c=1):
    d_real (1, 0.5), d_fake (0, 0.5): D loss 0.5 * mean(0, 0.25) + 0.5 * mean(0, 0.25) = 0.125;
    G loss 0.5 * mean(1, 0.25) = 0.3125."""
    d_real, d_fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    assert lsgan_d_loss(d_real, d_fake).item() == 0.125
    assert lsgan_d_loss(d_real, d_fake).item() == (0.5 * ((d_real - 1) ** 2 + d_fake ** 2).mean()).item()
    assert lsgan_g_loss(d_fake).item() == 0.3125


def test_three_spectral_norm_convolutions():
    """Every conv weight is spectrally parametrised; after power iterations in training mode the
    largest singular value of each reshaped [out, in*3*3] weight is 1 (the definition of spectral
    normalisation; measured 1.0004 at worst after 30 steps, tolerance 1e-2)."""
    torch.manual_seed(0)
    d = MaskDiscriminator((7, 7))
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    masks = torch.rand(4, 49)
    for _ in range(30):
        d(masks)
    for c in convs:
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 1e-2


def test_discriminator_accepts_flat_or_grid_masks():
    """[N, L], [N, gh, gw] and [N, 1, gh, gw] are the same masks -> same scores [N]; a mask of the
    wrong size is refused; the score is differentiable in the mask (the generator's adversarial
    path)."""
    torch.manual_seed(0)
    d = MaskDiscriminator((4, 6), channels=(8, 16)).eval()
    flat = torch.rand(3, 24, requires_grad=True)
    scores = d(flat)
    assert scores.shape == (3,)
    torch.testing.assert_close(d(flat.view(3, 4, 6)), scores)
    torch.testing.assert_close(d(flat.view(3, 1, 4, 6)), scores)
    (g,) = torch.autograd.grad(lsgan_g_loss(scores), flat)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="4x6"):
        d(torch.rand(3, 49))
