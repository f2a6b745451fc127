"""The pretraining level: an MAE reconstructs the patches that a masking mode chose.

The masking modes (``masking:`` in a ``Reconstruction`` entry) are ``MaskingSpec``'s
(``problems/masking_spec.py``): random, block, object_prior, mlo, gumbel and guided.

In the learned modes the masker is the module of the problem named ``masker`` (default ``mask``),
read through the engine, so unrolled steps and finite differences see the masker they perturb.
``MaskingSpec.make`` is the one function that turns (images, MAE, masker) into a ``Masking``; the
mask level and the discriminator reach it through ``Reconstruction.masks_with`` with *their own*
view of the masker (the ``MaskMaker`` interface).

Attention: a second-order push through this level differentiates the MAE twice, which timm's
fused CPU attention cannot; the builder switches the module (the ``fused_attention`` key).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mlomae.engine import Problem
from mlomae.models.masking import Masking, mask_agreement

from .masking_spec import MODES, SCORES, MaskingSpec

__all__ = ["MODES", "SCORES", "MaskingSpec", "Reconstructed", "Reconstruction", "ranking_loss",
           "split_batch"]


class Reconstructed(NamedTuple):
    loss: Tensor            # scalar, the masked (and in mlo mode probability-weighted) loss
    pred: Tensor            # [N, L, p*p*C] predicted patches (``mae.unpatchify`` for images)
    per_patch: Tensor       # [N, L] per-patch loss, visible patches included
    masking: Masking


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(images, labels or None, boxes or None) from ``x``, ``(x, y)`` or ``(x, y, boxes)``."""
    if isinstance(batch, Tensor):
        return batch, None, None
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    boxes = batch[2] if len(batch) > 2 else None
    return x, y, boxes


class Reconstruction(Problem):
    """MAE pretraining: minimise the reconstruction loss of the masked patches.

    YAML options beside the common keys: ``masking`` (random | object_prior | mlo | gumbel),
    ``mask_ratio`` (0.75), ``masker`` (the problem whose module masks, default ``mask``; must be in
    ``reads`` for mlo and gumbel), ``beta``, ``box_threshold``, ``background`` (object_prior),
    ``tau``, ``learned_fraction`` (gumbel; in mlo the share a discriminator judges),
    ``detach_masker_input`` (true), ``masker_input``
    (auto), ``weighting`` (mlo: ``probability``, MLO-MAE's, or ``normalized``, the masked
    patches' weights divided by their mean probability). The module is a
    ``MaskedAutoencoder``. Offers ``masks_with`` (``problems.interfaces.MaskMaker``). Guided
    masking: ``score``, ``random_share`` (0.5), ``temperature`` (1), ``warmup_steps`` (0);
    ``throw`` (0) in the random and guided modes. ``warmup_steps`` and ``ramp_steps`` are
    steps of this problem (an integer) or a share of its steps in the run (a float in [0, 1]:
    ``0.1`` warms up for the first tenth of pretraining, whatever the budget).
    """

    augment = True

    def __init__(self, *args, masking: str = "random", mask_ratio: float = 0.75,
                 masker: str = "mask", beta: float = 0.5, box_threshold: float = 0.5,
                 background: str = "border", tau: float = 1.0, learned_fraction: float = 1 / 3,
                 detach_masker_input: bool = True, masker_input: str = "auto",
                 weighting: str = "probability", score: str = "pixel_spread",
                 random_share: float = 0.5, temperature: float = 1.0, throw: float = 0.0,
                 warmup_steps: int | float = 0, ramp_steps: int | float = 0,
                 rank_weight: float = 1.0,
                 selection: str = "top", logit_clip: float = 0.0, prior_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = MaskingSpec(masking, mask_ratio, beta, box_threshold, background, tau,
                                learned_fraction, bool(detach_masker_input), masker_input,
                                weighting, score, float(random_share), float(temperature),
                                float(throw), selection, float(logit_clip), float(prior_weight))
        for key, v in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 \
                    or (isinstance(v, float) and v > 1):
                raise ValueError(f"{key} must be a number of steps (an integer >= 0) or a share "
                                 f"of this problem's steps in the run (a float in [0, 1]); got {v!r}")
        self._warmup, self._ramp, self.rank_weight = warmup_steps, ramp_steps, float(rank_weight)
        if self.spec.score == "predicted_loss" and (masking == "guided" or throw or prior_weight) \
                and getattr(self.module, "decoder_loss_pred", None) is None:
            raise ValueError("score predicted_loss needs the MAE's loss predictor: set "
                             "loss_predictor: true in its model")
        # the warm-up's masks: random, same ratio and throwing
        self.warmup_spec = MaskingSpec("random", mask_ratio, throw=float(throw), score=score)
        self.masker = masker
        self._held: tuple[Tensor, Tensor] | None = None   # (images, masker input) of the step
        if self.spec.learned and masker not in self.reads:
            raise ValueError(f"masking '{masking}' reads the masker of problem '{masker}': add "
                             f"it to problems.{self.name}.reads")

    # -- what other levels and the pictures code call -------------------------------------
    def _steps(self, key: str, v: int | float) -> int:
        """An option in steps: an integer as given, a float as that share of the run."""
        if isinstance(v, int):
            return v
        if self.total_steps is None:
            raise ValueError(f"problem '{self.name}': {key} {v} is a share of the run's steps, "
                             f"which only a runner knows: give a number of steps instead")
        return int(round(v * self.total_steps))

    @property
    def warmup_steps(self) -> int:
        return self._steps("warmup_steps", self._warmup)

    @property
    def ramp_steps(self) -> int:
        return self._steps("ramp_steps", self._ramp)

    def masks_with(self, imgs: Tensor, masker: nn.Module) -> Masking:
        """The masks this problem would train on for ``imgs`` if ``masker`` were its masker
        (``MaskMaker``): the mask level and a discriminator pass their own view of it."""
        if not self.spec.learned:
            raise ValueError(f"problem '{self.name}' masks with '{self.spec.mode}', which no "
                             f"masker decides: use masking mlo or gumbel")
        return self.spec.make(imgs, self.module, masker)

    def logits_with(self, imgs: Tensor, masker: nn.Module) -> Tensor:
        """``masker``'s own logits [N, L] for ``imgs`` as this level feeds it (before any prior
        or clipping): what the mask level watches for a collapse."""
        return self.spec.logits(imgs, self.module, masker)

    @property
    def mask_ratio(self) -> float:
        return self.spec.ratio

    def masking_for(self, imgs: Tensor, boxes: Tensor | None = None,
                    hold: bool = False) -> Masking:
        """The masks this problem would train on for ``imgs`` [N, C, H, W] (same mode, same
        masker); wrap in ``torch.no_grad()`` when only looking. ``hold``: the loss's own call,
        which keeps the masker's input for re-evaluations (``masker_input``)."""
        masker = self.read(self.masker) if self.spec.learned else None
        if self.spec.mode in ("guided", "mlo") and self.step_count < self.warmup_steps:
            return self.warmup_spec.make(imgs, self.module)
        spec = self.spec
        if spec.mode == "guided" and self.ramp_steps:
            done = min(1.0, (self.step_count - self.warmup_steps) / self.ramp_steps)
            spec = replace(spec, random_share=1.0 - (1.0 - spec.random_share) * done)
        held = self.masker_input(imgs, masker, hold) if masker is not None else None
        return spec.make(imgs, self.module, masker, boxes, held)

    def masker_input(self, imgs: Tensor, masker: nn.Module, hold: bool = False) -> Tensor | None:
        """The MAE's embeddings of ``imgs`` where the masker reads them detached (else None):
        data to the masker, as images are. A finite difference re-evaluates the loss at the MAE's
        parameters moved by +-eps v; recomputed there, the embeddings (and the masker's logits
        and masks) would move too, a path no gradient has. So the loss's call (``hold``) keeps
        them, and a re-evaluation of that batch (``replaying``) reads them."""
        if not self.spec.detach_masker_input or self.spec.reads_images(masker):
            return None
        if self.replaying and self._held is not None and self._held[0] is imgs:
            # a bf16-autocast step, a full-precision re-evaluation: the parameters' dtype
            return self._held[1].to(next(self.module.parameters()).dtype)
        with torch.no_grad():
            x = self.module.embed_patches(imgs)
        if hold and not self.replaying:
            self._held = (imgs, x)
        return x

    def reconstruct(self, imgs: Tensor, masking: Masking | None = None,
                    boxes: Tensor | None = None) -> Reconstructed:
        """Reconstruct ``imgs`` under ``masking`` (default: ``masking_for(imgs)``)."""
        masking = self.masking_for(imgs, boxes) if masking is None else masking
        loss, pred, per_patch = self.module(imgs, masking)
        return Reconstructed(loss, pred, per_patch, masking)

    # -- the level's loss -------------------------------------------------------------------
    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        imgs, _, boxes = split_batch(batch)
        out = self.reconstruct(imgs, self.masking_for(imgs, boxes, hold=True))
        m = out.masking
        logs = {"masked_patch_loss": ((out.per_patch * m.mask).sum() / m.mask.sum()).detach()}
        if self.spec.mode != "random" or self.spec.throw:
            # how image-dependent the masks are (about 0 for uniform random ones)
            logs["mask_agreement"] = mask_agreement(m.mask)
        probs = m.probs if m.probs is not None else m.weights
        if probs is not None:
            # what pretraining does to the masker: the mean probability of the masked patches
            logs["masked_prob"] = ((probs * m.mask).sum() / m.mask.sum()).detach()
        if self.spec.score == "predicted_loss" and self.module.decoder_loss_pred is not None:
            rank = ranking_loss(self.module.predict_patch_loss(imgs), out.per_patch.detach(), m)
            logs["rank_loss"] = rank.detach()
            return out.loss + self.rank_weight * rank, logs
        return out.loss, logs


def ranking_loss(pred: Tensor, target: Tensor, masking: Masking) -> Tensor:
    """HPM's relative loss-prediction objective over each image's masked patches: for every
    ordered pair (i, j), binary cross-entropy of sigmoid(pred_i - pred_j) against whether
    target_i > target_j (pairs with equal targets left out). pred, target [N, L]."""
    ids = torch.argsort(masking.ids_restore, dim=1)                 # visible, masked, thrown
    k = int(masking.mask[0].detach().sum())
    idx = ids[:, masking.num_keep:masking.num_keep + k]             # the masked patches [N, k]
    p, t = pred.gather(1, idx), target.gather(1, idx)
    diff = p[:, :, None] - p[:, None, :]                            # [N, k, k]
    label = (t[:, :, None] > t[:, None, :]).to(diff.dtype)
    valid = (t[:, :, None] != t[:, None, :]).to(diff.dtype)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(diff, label, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1.0)
