"""How pretraining masks a batch: ``MaskingSpec``, whose ``make`` is the one function from
(images, MAE, masker) to a ``Masking``.

Masking modes (``masking:`` in a ``Reconstruction`` entry):

- ``random``: MAE's uniform random masking.
- ``block``: one object-like rectangle of masked patches per image (``random_rect_masks``: an
  aspect ratio log-uniform in [1/3, 3], exactly ``mask_ratio`` of the patches), the fixed
  alternative to random masks.
- ``object_prior``: AutoMAE's Figure 2 prior: patches overlapping the object box are masked with
  weight ``1 + beta``. Boxes come with the batch when the dataset has them (``(x, y, boxes)``),
  else from ``foreground_boxes`` (the box of pixels that differ from the border by more than
  ``box_threshold``, in normalised units).
- ``mlo``: MLO-MAE: the masker's probabilities, top ``mask_ratio`` masked, each masked patch's loss
  multiplied by its probability (the masker's only differentiable path). For a discriminator,
  ``learned_mask`` holds the ``learned_fraction`` most probable of them (straight-through).
  Repairs of the published failure modes, each an option (the defaults are the published
  masker): ``selection: sampled`` draws the masked patches instead of taking the top ones
  (Gumbel-top-k on logit/``temperature`` for ``1 - random_share`` of them, the rest uniform;
  the probabilities still weight the loss), ``logit_clip: c`` bounds the logits softly
  (c·tanh(logit/c)) so no probability saturates, ``weighting: normalized`` keeps the masked
  weights at mean 1, and ``warmup_steps`` starts with random masks. ``prior_weight: w`` gives
  the masker a self-guided prior: w times each image's ``score`` (pixel spread, the MAE's
  attention or its predicted loss), standardised over its patches, added to the logits.
- ``gumbel``: AutoMAE's generator: a Gumbel top-k with a straight-through estimator (``tau``),
  ``learned_fraction`` of the masked slots chosen by the generator, the rest random.
- ``guided``: self-guided masks with no masker and no hypergradient (AMT): a per-patch
  ``score`` from the image or the MAE itself (``pixel_spread``: each patch's pixel standard
  deviation, free; ``attention``: the MAE's last-block class-token attention on the unmasked
  image, one extra forward without gradient), masks *sampled* ∝ score^(1/``temperature``) for
  ``1 - random_share`` of the masked slots and uniform for the rest (``models.masking.
  guided_masking``), random masks for the first ``warmup_steps`` steps of this problem;
  ``predicted_loss`` (HPM): the MAE's own loss predictor (``MaskedAutoencoder(loss_predictor=
  true)``), trained here with a pairwise ranking loss on the masked patches' reconstruction
  losses (weight ``rank_weight``); with ``temperature: 0`` the highest-predicted patches are
  taken rather than sampled, and ``ramp_steps`` ramps their share of the mask from 0 to
  ``1 - random_share`` (HPM's easy-to-hard schedule).

``throw`` (random and guided modes) throws the given share of each image's lowest-scored
patches (by ``score``) out of both the encoder input and the loss (AMT's throwing); the mask
ratio then applies to the patches kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlomae.models.masking import (Masking, foreground_boxes, guided_masking, gumbel_topk_masking,
                                   masking_from_hard, num_learned, num_masked, num_thrown,
                                   object_prior_masking, patch_spread, prob_topk_masking,
                                   random_masking, random_rect_masks)

MODES = ("random", "block", "object_prior", "mlo", "gumbel", "guided")
SCORES = ("pixel_spread", "attention", "predicted_loss")


@dataclass(frozen=True)
class MaskingSpec:
    """How a batch's masks are made; see the module docstring for the modes."""

    mode: str = "random"
    ratio: float = 0.75
    beta: float = 0.5                  # object_prior: weight 1 + beta inside the box
    box_threshold: float = 0.5         # object_prior: foreground = |x - border median| > this
    background: str = "border"         # object_prior: "border" or "zero"
    tau: float = 1.0                   # gumbel: softmax temperature of the straight-through term
    learned_fraction: float = 1 / 3    # gumbel: share of the masked slots the generator picks;
                                       # mlo: share of them a discriminator judges
    detach_masker_input: bool = True   # mlo/gumbel over MAE embeddings: cut the masker's input
    masker_input: str = "auto"         # embeddings | images | auto (images if it has patch_embed)
    weighting: str = "probability"     # mlo: loss weights = probabilities | normalized (mean 1)
    score: str = "pixel_spread"        # guided (and throw): pixel_spread | attention | predicted_loss
    random_share: float = 0.5          # guided: share of the masked slots drawn uniformly
    temperature: float = 1.0           # guided: masks drawn ∝ score^(1/temperature); 0: top scores
    throw: float = 0.0                 # random, guided: share of patches thrown out (lowest score)
    selection: str = "top"             # mlo: top (published) | sampled (random_share, temperature)
    logit_clip: float = 0.0            # mlo: logits -> c * tanh(logits / c); 0: off
    prior_weight: float = 0.0          # mlo, gumbel: + w * (the image's standardised score) on
                                       # the masker's logits (a self-guided prior it learns around)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"masking must be one of {', '.join(MODES)} (got {self.mode!r})")
        num_masked(100, self.ratio)    # raises on a ratio outside (0, 1)
        if self.masker_input not in ("auto", "embeddings", "images"):
            raise ValueError(f"masker_input must be auto, embeddings or images "
                             f"(got {self.masker_input!r})")
        if self.mode == "gumbel" and not self.tau > 0:
            raise ValueError(f"tau must be > 0 (got {self.tau!r})")
        if not 0.0 <= self.learned_fraction <= 1.0:
            raise ValueError(f"learned_fraction must lie in [0, 1] (got {self.learned_fraction!r})")
        if self.weighting not in ("probability", "normalized"):
            raise ValueError(f"weighting must be probability or normalized (got {self.weighting!r})")
        if self.background not in ("border", "zero"):
            raise ValueError(f"background must be border or zero (got {self.background!r})")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)} (got {self.score!r})")
        if not 0.0 <= self.random_share <= 1.0:
            raise ValueError(f"random_share must lie in [0, 1] (got {self.random_share!r})")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature!r})")
        if self.selection not in ("top", "sampled"):
            raise ValueError(f"selection must be top or sampled (got {self.selection!r})")
        if not self.logit_clip >= 0:
            raise ValueError(f"logit_clip must be >= 0 (got {self.logit_clip!r})")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0 (got {self.prior_weight!r})")
        if self.prior_weight and not self.learned:
            raise ValueError(f"prior_weight applies to masking mlo or gumbel, not {self.mode!r}")
        if self.throw and self.mode not in ("random", "guided"):
            raise ValueError(f"throw applies to masking random or guided, not {self.mode!r}")
        num_masked(100 - num_thrown(100, self.throw), self.ratio)   # raises on a bad throw

    @property
    def learned(self) -> bool:
        return self.mode in ("mlo", "gumbel")

    def reads_images(self, masker: nn.Module) -> bool:
        if self.masker_input == "auto":
            return hasattr(masker, "patch_embed")
        return self.masker_input == "images"

    def logits(self, imgs: Tensor, mae: nn.Module, masker: nn.Module,
               embeddings: Tensor | None = None) -> Tensor:
        """The masker's patch logits [N, L] (``embeddings``: the MAE's embeddings of ``imgs``
        when the caller holds them).

        Over MAE embeddings, ``detach_masker_input`` (default true) stops the pretraining loss
        from training the MAE's patch embedding *through the masker*: with the loss multiplied
        by the mask probabilities, the cheapest way for pretraining to lower it is to move the
        embeddings so that the masker outputs smaller probabilities (DESIGN.md's warning about
        the official wiring). ``false`` reproduces the official wiring.
        """
        if self.reads_images(masker):
            x = imgs
        else:
            x = mae.embed_patches(imgs) if embeddings is None else embeddings   # [N, L, D]
            x = x.detach() if self.detach_masker_input else x
        # maskers expose logits(x); a generator's forward returns logits itself
        return masker.logits(x) if hasattr(masker, "logits") else masker(x)

    def scores(self, imgs: Tensor, mae: nn.Module) -> Tensor:
        """The guided modes' per-patch score [N, L] (no gradient)."""
        if self.score == "predicted_loss":
            with torch.no_grad():
                return mae.predict_patch_loss(imgs)
        if self.score == "attention":
            was = mae.training
            mae.eval()
            try:
                return mae.cls_attention(imgs)
            finally:
                mae.train(was)
        return patch_spread(imgs.detach(), mae.patch_size)

    def prior(self, imgs: Tensor, mae: nn.Module) -> Tensor:
        """The masker's self-guided prior [N, L]: each image's ``score`` standardised to mean 0
        and standard deviation 1 over its patches (0 for an image whose patches all score the
        same); no gradient."""
        with torch.no_grad():
            s = self.scores(imgs, mae).float()
            std = s.std(dim=1, unbiased=False, keepdim=True)
            return torch.where(std > 1e-6, (s - s.mean(dim=1, keepdim=True)) / std.clamp_min(1e-6),
                               torch.zeros_like(s))

    def make(self, imgs: Tensor, mae: nn.Module, masker: nn.Module | None = None,
             boxes: Tensor | None = None, embeddings: Tensor | None = None) -> Masking:
        """One ``Masking`` for images [N, C, H, W]. Randomness from torch's global generator;
        ``embeddings`` as in ``logits``."""
        N, L = imgs.shape[0], mae.num_patches
        if self.mode == "random" and not self.throw:
            return random_masking(N, L, self.ratio, device=imgs.device)
        if self.mode == "block":
            rects = random_rect_masks(N, mae.grid_size, self.ratio, device=imgs.device)
            return masking_from_hard(rects.flatten(1).to(imgs.dtype))
        if self.mode in ("random", "guided"):
            share = 1.0 if self.mode == "random" else self.random_share
            return guided_masking(self.scores(imgs, mae), self.ratio, random_share=share,
                                  temperature=self.temperature, throw=self.throw)
        if self.mode == "object_prior":
            if boxes is None:
                boxes = foreground_boxes(imgs, self.box_threshold, self.background)
            return object_prior_masking(boxes, mae.grid_size, mae.patch_size, self.ratio, self.beta)
        if masker is None:
            raise ValueError(f"masking '{self.mode}' needs a masker")
        logits = self.logits(imgs, mae, masker, embeddings)        # [N, L]
        if self.prior_weight:
            logits = logits + self.prior_weight * self.prior(imgs, mae).to(logits.dtype)
        if self.mode == "gumbel":
            return gumbel_topk_masking(logits, self.ratio, self.tau, self.learned_fraction)
        if self.logit_clip:
            logits = self.logit_clip * torch.tanh(logits / self.logit_clip)
        probs = torch.sigmoid(logits)
        if self.selection == "sampled":
            masking = guided_masking(logits, self.ratio, random_share=self.random_share,
                                     temperature=self.temperature, log_scores=True)
            masking.probs = probs
            if self.weighting == "normalized":
                mean = (probs * masking.mask).sum(1, keepdim=True) / masking.mask.sum(1, keepdim=True)
                masking.weights = probs / mean
            else:
                masking.weights = probs
        else:
            masking = prob_topk_masking(probs, self.ratio, normalize=self.weighting == "normalized")
        # For a discriminator, as AutoMAE's judges the generator's share: the learned_fraction
        # most probable patches (a subset of the masked ones: the same stable descending order),
        # with a straight-through path to the probabilities.
        k = num_learned(L, self.ratio, self.learned_fraction)
        pool = probs.detach().masked_fill(masking.mask.detach() == 0, -1.0)   # masked ones only
        top = torch.sort(pool, dim=1, descending=True, stable=True).indices[:, :k]
        learned = torch.zeros_like(probs).scatter_(1, top, 1.0)
        masking.learned_mask = learned + (probs - probs.detach())
        return masking
