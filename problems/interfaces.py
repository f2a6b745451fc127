"""What the masked-image-modeling problems call on each other beyond a peer's module.

A problem that needs one of these from a peer returns it from ``needs()``; the engine checks the
peer when it connects the problems. Your own problem can stand in for a built-in one by
offering the same methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from mlomae.models.masking import Masking


@runtime_checkable
class MaskMaker(Protocol):
    """A pretraining level whose masks a masker decides (``Reconstruction`` with masking mlo or
    gumbel): the mask level and a discriminator make masks with their own view of the masker."""

    def masks_with(self, imgs: Tensor, masker: nn.Module) -> Masking:
        """The masks this level would train on for ``imgs`` if ``masker`` were its masker."""
        ...

    @property
    def mask_ratio(self) -> float:
        """The share of patches masked."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """A downstream level (``Classification``): class logits of images through its head and
    the encoder it reads."""

    def logits(self, imgs: Tensor) -> Tensor:
        ...


@runtime_checkable
class MaskGenerator(Protocol):
    """A masker's level (``MaskLearning``): the masks its masker makes for images."""

    def generate(self, imgs: Tensor) -> Masking:
        ...
