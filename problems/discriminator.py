"""AutoMAE's discriminator level: tell the generator's masks from object-like rectangles.

    loss = 0.5 E[(D(real) - 1)^2] + 0.5 E[D(fake)^2]          (LSGAN, ``lsgan_d_loss``)

fake: the generator's learned masks (``Masking.learned_mask``: the generator-chosen slots only),
made by the generator problem with its own module and detached; real: ``random_rect_masks`` with
the same count of masked patches, so that the count alone never gives a mask away. The schedule
decides how the discriminator alternates with the generator (``steps`` of this problem per step
of the generator when the generator depends on it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from mlomae.engine import Problem
from mlomae.models.discriminator import lsgan_d_loss
from mlomae.models.masking import random_rect_masks

from .interfaces import MaskGenerator
from .pretrain import split_batch


class Discriminator(Problem):
    """YAML options: ``generator`` (the problem whose masks are the fakes, default ``mask``; must
    be in ``reads``), ``aspect`` (the real rectangles' aspect-ratio range, [1/3, 3]). The module
    is a ``MaskDiscriminator`` over the MAE's patch grid."""

    augment = True   # the generator masks augmented pretraining images: judge the same kind

    def __init__(self, *args, generator: str = "mask", aspect: Sequence[float] = (1 / 3, 3.0),
                 **kwargs):
        super().__init__(*args, **kwargs)
        if generator not in self.reads:
            raise ValueError(f"the discriminator reads the masks of problem '{generator}': add "
                             f"it to problems.{self.name}.reads")
        if len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be [low, high] with 0 < low <= high (got {aspect!r})")
        self.generator, self.aspect = generator, (float(aspect[0]), float(aspect[1]))

    def needs(self) -> dict[str, type]:
        return {self.generator: MaskGenerator}

    def fake_and_real(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Generated masks [N, L] (detached) and real rectangles [N, gh, gw] of the same count."""
        with torch.no_grad():
            fake = self.peer(self.generator).generate(imgs).learned_mask.detach()
        count = int(round(float(fake[0].sum())))
        real = random_rect_masks(fake.shape[0], self.module.grid_size, None, count=count,
                                 aspect=self.aspect, device=fake.device).to(fake.dtype)
        return fake, real

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        imgs, _, _ = split_batch(batch)
        fake, real = self.fake_and_real(imgs)
        d_real, d_fake = self.module(real), self.module(fake)
        return lsgan_d_loss(d_real, d_fake), {"d_real": d_real.mean().detach(),
                                              "d_fake": d_fake.mean().detach()}
