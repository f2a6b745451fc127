"""The mask level: what the masking network (MLO-MAE's masker, AutoMAE's generator) minimises.

    loss = downstream     x  CE(head(encoder(x)), y) on held-out labeled data (MLO-MAE's level 3)
         + adversarial    x  LSGAN generator loss of the discriminator on the generator's masks
         + reconstruction x  the MAE's reconstruction loss under the generator's masks
         - entropy        x  mean binary entropy of the per-patch mask probabilities
         - diversity      x  mean over patches of the probabilities' std across the batch
         + ratio_kl       x  mean KL(Bernoulli(mask ratio) || Bernoulli(an image's mean prob.))

The last three are regularisers on the masker's probabilities (masking mlo): against
saturation, against one mask for every image, against drifting from the target ratio.

Besides each term, the level logs what shows a collapse as it happens: ``mask_agreement`` and
``masked_prob`` (``mask_stats``), and ``common_mode``, the share of the last update's change of
the masker's logits (on a fixed probe of the first batch's images) that moves every patch of an
image together (``common_mode_share``): 1 when a step only raises or lowers all probabilities
at once (the per-patch masker's way of switching pretraining off), about 1/L for a change with
no preferred direction, 0 for a centred masker; ``logit_step`` is that change's RMS.

Only the last two depend on the masker directly; the downstream term reaches it only through the
hypergradient the engine pushes down through the head and the MAE. The masks are made by the
pretraining problem (``masks_with``) with *this* problem's module as the masker, so the mask
level and the pretraining level always mask the same way; the downstream term asks the
fine-tune problem for its logits. Both are declared in ``needs()``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mlomae.engine import Problem
from mlomae.models.discriminator import lsgan_g_loss
from mlomae.models.masking import Masking, mask_agreement

from .interfaces import Classifier, MaskMaker
from .pretrain import split_batch

PROBE = 16          # images of the first batch on which the masker's logit changes are watched
TERMS = ("downstream", "adversarial", "reconstruction", "entropy", "diversity", "ratio_kl")
REGULARISERS = ("entropy", "diversity", "ratio_kl")


class MaskLearning(Problem):
    """YAML options: ``losses: {downstream: 1.0, adversarial: 0.0, reconstruction: 0.0}`` (the
    weights; a term with weight 0 is not computed), ``pretrain`` / ``finetune`` /
    ``discriminator`` (problem names, default pretrain / finetune / disc; each term's problems
    must be in ``reads``). Offers ``generate`` (``problems.interfaces.MaskGenerator``).

    AutoMAE's generator loss is ``reconstruction: 1.0, adversarial: 0.2``; MLO-MAE's is
    ``downstream: 1.0``. The weights multiply the terms as they are (nothing is normalised), so
    AutoMAE's 0.2 is a ratio to the reconstruction term's weight.
    """

    def __init__(self, *args, losses: Mapping[str, float] | None = None,
                 pretrain: str = "pretrain", finetune: str = "finetune",
                 discriminator: str = "disc", **kwargs):
        super().__init__(*args, **kwargs)
        weights = {"downstream": 1.0, **{t: 0.0 for t in TERMS[1:]}}
        for k, v in (losses or {}).items():
            if k not in weights:
                raise ValueError(f"unknown loss term '{k}' in losses; terms: {', '.join(TERMS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"losses.{k} must be a number (got {v!r})")
            weights[k] = float(v)
        if not any(weights.values()):
            raise ValueError("every loss weight is 0: the masker would learn nothing")
        self.weights = weights
        self._probe: Tensor | None = None          # fixed images, and the masker's logits on them
        self._probe_logits: Tensor | None = None   # after the last update
        self.pretrain, self.finetune, self.discriminator = pretrain, finetune, discriminator
        needs = {pretrain: "masks and encoder"}
        if weights["downstream"]:
            needs[finetune] = "the head of the downstream term"
        if weights["adversarial"]:
            needs[discriminator] = "the discriminator of the adversarial term"
        for name, why in needs.items():
            if name not in self.reads:
                raise ValueError(f"problem '{self.name}' reads '{name}' ({why}): add it to "
                                 f"problems.{self.name}.reads")

    def needs(self) -> dict[str, type]:
        needs: dict[str, type] = {self.pretrain: MaskMaker}
        if self.weights["downstream"]:
            needs[self.finetune] = Classifier
        return needs

    def generate(self, imgs: Tensor) -> Masking:
        """This masker's masks for ``imgs``, made as the pretraining problem makes them."""
        return self.peer(self.pretrain).masks_with(imgs, self.module)

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        imgs, labels, _ = split_batch(batch)
        w, logs, total = self.weights, {}, 0.0
        if w["downstream"]:
            logits = self.peer(self.finetune).logits(imgs)
            ce = F.cross_entropy(logits, labels)
            total = total + w["downstream"] * ce
            logs["downstream"] = ce.detach()
            logs["val_top1"] = (logits.argmax(1) == labels).float().mean().detach()
        regs = [t for t in REGULARISERS if w[t]]
        if w["adversarial"] or w["reconstruction"] or regs:
            masking = self.generate(imgs)
            if regs:
                terms = regularisers(masking, self.peer(self.pretrain).mask_ratio, regs)
                for t in regs:
                    total = total + (-w[t] if t in ("entropy", "diversity") else w[t]) * terms[t]
                    logs[t] = terms[t].detach()
            if w["adversarial"]:
                adv = lsgan_g_loss(self.read(self.discriminator)(masking.learned_mask))
                total = total + w["adversarial"] * adv
                logs["adversarial"] = adv.detach()
            if w["reconstruction"]:
                rec = self.read(self.pretrain)(imgs, masking)[0]
                total = total + w["reconstruction"] * rec
                logs["reconstruction"] = rec.detach()
        else:
            with torch.no_grad():
                masking = self.generate(imgs)
        logs.update(mask_stats(masking))
        logs.update(self._watch_logits(imgs))
        return total, logs

    def _watch_logits(self, imgs: Tensor) -> dict[str, Tensor]:
        """``common_mode`` and ``logit_step`` of the change in the masker's logits on the probe
        since the previous call (nothing on the first call, or when nothing changed: a second
        evaluation within one step)."""
        with torch.no_grad():
            if self._probe is None:
                self._probe = imgs[:PROBE].detach().clone()
            logits_with = getattr(self.peer(self.pretrain), "logits_with", None)
            if logits_with is None:   # a pretraining level of one's own need not offer it
                return {}
            z = logits_with(self._probe, self.module).float()
            prev, self._probe_logits = self._probe_logits, z
            if prev is None or prev.shape != z.shape:
                return {}
            delta = z - prev
            sq = delta.pow(2).mean()
            if not sq > 0:
                return {}
            return {"common_mode": common_mode_share(delta), "logit_step": sq.sqrt()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._probe is not None:   # a resumed run logs the same changes
            state["probe"] = {"images": self._probe, "logits": self._probe_logits}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        probe = state.get("probe")
        self._probe = None if probe is None else probe["images"]
        self._probe_logits = None if probe is None else probe["logits"]


def common_mode_share(delta: Tensor) -> Tensor:
    """The share of ``delta`` [N, L]'s squared norm along each row's constant direction:
    sum_n L * mean_j(delta_nj)^2 / sum_nj delta_nj^2 (1: every patch of an image moved alike;
    0: each image's changes sum to zero)."""
    L = delta.shape[1]
    return L * delta.mean(dim=1).pow(2).sum() / delta.pow(2).sum()


def regularisers(masking: Masking, ratio: float, which=REGULARISERS) -> dict[str, Tensor]:
    """The masker's regulariser terms from its probabilities p [N, L] (with their gradient):
    ``entropy`` mean_nj H(p_nj) with H the binary entropy; ``diversity`` mean_j std_n(p_nj);
    ``ratio_kl`` mean_n KL(Bern(ratio) || Bern(mean_j p_nj)). Needs masking mlo."""
    p = masking.probs
    if p is None:
        raise ValueError("the masker's regularisers (entropy, diversity, ratio_kl) need the "
                         "probabilities of masking mlo")
    q = p.clamp(1e-6, 1 - 1e-6)
    out = {}
    if "entropy" in which:
        out["entropy"] = -(q * q.log() + (1 - q) * (1 - q).log()).mean()
    if "diversity" in which:
        out["diversity"] = p.std(dim=0, unbiased=False).mean()
    if "ratio_kl" in which:
        m = q.mean(dim=1)
        out["ratio_kl"] = (ratio * math.log(ratio) - ratio * m.log()
                           + (1 - ratio) * math.log(1 - ratio) - (1 - ratio) * (1 - m).log()).mean()
    return out


def mask_stats(masking: Masking) -> dict[str, Tensor]:
    """What to watch for a degenerate masker: ``masked_prob`` (mean probability of the masked
    patches, mlo mode) and ``mask_agreement``, mean |freq_j - k| / (2k(1 - k)) over patches j with
    freq_j the share of the batch masking patch j and k the masked share: about 0 when masks are
    independent of the image, 1 when every image gets the same mask (a collapse onto fixed
    patches)."""
    mask = masking.mask.detach()
    stats = {"mask_agreement": mask_agreement(mask).to(mask.dtype)}
    probs = masking.probs if masking.probs is not None else masking.weights
    if probs is not None:
        w = probs.detach()
        stats["masked_prob"] = (w * mask).sum() / mask.sum()
    return stats
