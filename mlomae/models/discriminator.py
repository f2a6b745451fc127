"""AutoMAE's mask discriminator and its least-squares GAN losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["MaskDiscriminator", "lsgan_d_loss", "lsgan_g_loss"]


class MaskDiscriminator(nn.Module):
    """Scores a patch-grid mask: real (object-like rectangle) vs generated.

    Spectral-norm 3x3 convolutions ``1 -> channels[0] -> ... -> channels[-1] -> 1`` with
    LeakyReLU(0.2) between them, the hidden ones at stride 2; the last map is averaged to one
    score per sample. The default ``channels=(32, 64)`` gives AutoMAE's three convolutions.
    Spectral norm bounds each layer's Lipschitz constant, which keeps the adversarial signal
    reaching the generator smooth.
    """

    def __init__(self, grid_size: tuple[int, int], channels: tuple[int, ...] = (32, 64)):
        super().__init__()
        self.grid_size = tuple(grid_size)
        layers: list[nn.Module] = []
        chans = (1, *channels)
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)),
                       nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(chans[-1], 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, masks: Tensor) -> Tensor:
        """masks [N, L], [N, gh, gw] or [N, 1, gh, gw] -> scores [N]."""
        gh, gw = self.grid_size
        if masks[0].numel() != gh * gw:
            raise ValueError(f"expected masks of {gh}x{gw} patches, got shape {tuple(masks.shape)}")
        x = masks.reshape(masks.shape[0], 1, gh, gw)
        # in the parameters' precision even under autocast: spectral norm's power iteration
        # gave non-finite gradients in bf16 at small widths, and the network is tiny
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.net[0].bias.dtype)
            return self.net(x).mean(dim=(1, 2, 3))                  # [N, 1, h', w'] -> [N]


def lsgan_d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Least-squares GAN discriminator loss: 0.5 * E[(D(real) - 1)^2] + 0.5 * E[D(fake)^2].

    Equals ``0.5 * ((d_real - 1)^2 + d_fake^2).mean()`` when both have the same size; written as
    two means so real and fake batches may differ in size.
    """
    return 0.5 * ((d_real - 1) ** 2).mean() + 0.5 * (d_fake ** 2).mean()


def lsgan_g_loss(d_fake: Tensor) -> Tensor:
    """Least-squares GAN generator loss: 0.5 * E[(D(fake) - 1)^2]."""
    return 0.5 * ((d_fake - 1) ** 2).mean()
