"""Masking: which patches the MAE must reconstruct, as pure functions over tensors.

Every mode returns one ``Masking``; the MAE reads nothing else. Conventions:

- ``mask`` [N, L]: 1 = masked, 0 = visible. Its forward value is always exactly 0/1; in the
  learned modes it may carry a gradient (straight-through), which reaches the mask's source only
  through ``MaskedAutoencoder.masked_loss`` multiplying the per-patch loss by it.
- ``ids_keep`` [N, L_keep]: the visible patches, in the order the encoder receives them.
  ``random_masking`` keeps MAE's shuffled order (so it equals MAE's construction exactly); every
  other mode sorts them ascending.
- ``ids_restore`` [N, L]: inverse of ``ids_shuffle = cat(ids_keep, ids_masked)``. The decoder
  appends L - L_keep mask tokens to the visible tokens and gathers with it to unshuffle.
- Every sample has exactly ``num_masked(L, ratio)`` masked patches in every mode: the encoder
  batches visible tokens as one dense [N, L_keep, D] tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Masking", "num_masked", "num_learned", "masking_from_hard", "random_masking",
    "score_masking", "prob_topk_masking", "gumbel_topk_masking", "sample_gumbel",
    "box_patches", "object_prior_masking", "foreground_boxes", "random_rect_masks",
    "patch_spread", "masking_from_sets", "num_thrown", "guided_masking",
]


@dataclass
class Masking:
    """One batch's mask. See the module docstring for the conventions of each field."""

    mask: Tensor                    # [N, L] float, 1 = masked; may carry a straight-through gradient
    ids_keep: Tensor                # [N, L_keep] long, visible patch indices
    ids_restore: Tensor             # [N, L] long, unshuffles cat(visible, mask tokens)
    weights: Tensor | None = None   # [N, L] per-patch loss weights (MLO-MAE: mask probabilities)
    learned_mask: Tensor | None = None  # [N, L] AutoMAE: the generator-chosen part only (for D)
    probs: Tensor | None = None     # [N, L] MLO-MAE: the masker's probabilities (for the logs)

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_masked(self) -> int:
        """Patches not given to the encoder (masked and thrown)."""
        return self.ids_restore.shape[1] - self.ids_keep.shape[1]


def num_masked(L: int, ratio: float) -> int:
    """Exact number of masked patches out of ``L``.

    Rounding is MAE's: it keeps ``int(L * (1 - ratio))`` patches visible and masks the rest, so
    the masked count rounds up (L=49, ratio=0.75: 12 visible, 37 masked). A 1e-9 guard keeps float
    error from dropping a visible patch (10 * (1 - 0.9) = 0.9999999999999998).
    """
    try:   # numpy scalars and 0-d tensors are fine; strings and bools are config mistakes
        r = float("nan") if isinstance(ratio, (str, bytes, bool)) else float(ratio)
    except (TypeError, ValueError):
        r = float("nan")
    if not 0.0 < r < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio!r}")
    keep = int(L * (1.0 - r) + 1e-9)
    if keep < 1 or keep > L - 1:
        raise ValueError(f"mask ratio {ratio!r} leaves {keep} of {L} patches visible; "
                         f"need at least one masked and one visible")
    return L - keep


def num_learned(L: int, ratio: float, learned_fraction: float) -> int:
    """How many of the ``num_masked(L, ratio)`` slots the AutoMAE generator picks (rounded)."""
    if not 0.0 <= learned_fraction <= 1.0:
        raise ValueError(f"learned_fraction must be in [0, 1], got {learned_fraction!r}")
    return int(round(learned_fraction * num_masked(L, ratio)))


def _topk_indicator(scores: Tensor, k: int) -> Tensor:
    """[N, L] -> float 0/1 with ones at the k highest scores; ties go to the lower index."""
    # A stable descending sort keeps equal scores in index order: deterministic tie-breaking.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    hard = torch.zeros(scores.shape, dtype=scores.dtype if scores.is_floating_point()
                       else torch.get_default_dtype(), device=scores.device)
    return hard.scatter_(1, order, 1.0)


def masking_from_hard(hard: Tensor, mask: Tensor | None = None, weights: Tensor | None = None,
                      learned_mask: Tensor | None = None) -> Masking:
    """Build a ``Masking`` from a hard 0/1 mask [N, L] with the same count of ones in every row.

    ``mask`` (same values, possibly with a gradient) replaces ``hard`` in the result when given.
    """
    counts = hard.detach().sum(dim=1)
    if hard.dim() != 2 or not torch.all(counts == counts[0]):
        raise ValueError(f"need [N, L] masks with one count of masked patches per row, "
                         f"got shape {tuple(hard.shape)} with counts {counts.tolist()}")
    keep = hard.shape[1] - int(counts[0].item())
    # Stable ascending sort of the 0/1 mask: visible patches first, each group in index order.
    ids_shuffle = torch.sort(hard.detach(), dim=1, stable=True).indices  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Masking(mask=hard if mask is None else mask, ids_keep=ids_shuffle[:, :keep],
                   ids_restore=ids_restore, weights=weights, learned_mask=learned_mask)


def random_masking(N: int, L: int, ratio: float, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None, noise: Tensor | None = None) -> Masking:
    """MAE's uniform random masking: argsort of uniform noise, keep the first ``L_keep``.

    The patches with the smallest noise stay visible; ``ids_restore`` is the inverse permutation.
    Given ``noise`` [N, L] the result equals MAE's ``random_masking`` exactly, ``ids_keep`` in its
    shuffled (not ascending) order.
    """
    keep = L - num_masked(L, ratio)
    if noise is None:
        noise = torch.rand(N, L, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)        # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]                 # [N, L_keep]
    mask = torch.ones(N, L, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
    return Masking(mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def score_masking(scores: Tensor, ratio: float) -> Masking:
    """Mask the ``num_masked`` highest scores of each row [N, L]; ties go to the lower index.

    Deterministic and not differentiable: the selection carries no gradient.
    """
    k = num_masked(scores.shape[1], ratio)
    return masking_from_hard(_topk_indicator(scores.detach(), k))


def prob_topk_masking(probs: Tensor, ratio: float, normalize: bool = False) -> Masking:
    """MLO-MAE: mask the top-k masker probabilities [N, L]; ``weights = probs`` (with gradient).

    The hard selection has no gradient. ``masked_loss`` multiplies each masked patch's loss by its
    probability, which is the only differentiable path from the reconstruction loss to the masker.

    ``normalize``: divide each image's weights by the mean probability of its masked patches
    (gradient through both), so the weights of the masked patches average 1. Scaling every
    probability by one factor then changes nothing: the masker can move weight between patches
    but cannot raise the whole loss, i.e. pretraining's effective learning rate.
    """
    selected = score_masking(probs, ratio)
    selected.probs = probs
    if normalize:
        mean = (probs * selected.mask).sum(1, keepdim=True) / selected.mask.sum(1, keepdim=True)
        selected.weights = probs / mean
    else:
        selected.weights = probs
    return selected


def sample_gumbel(shape: tuple[int, ...], *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)``, U uniform, clamped away from 0 to stay finite."""
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def gumbel_topk_masking(logits: Tensor, ratio: float, tau: float, learned_fraction: float,
                        generator: torch.Generator | None = None,
                        gumbel: Tensor | None = None) -> Masking:
    """AutoMAE: a K-of-L mask from patch logits [N, L] with a straight-through Gumbel-softmax.

    - Perturb: ``y = logits + g``, g standard Gumbel (``gumbel`` [N, L] if given, else drawn).
    - Learned slots: the ``num_learned(L, ratio, learned_fraction)`` largest ``y`` are masked.
      AutoMAE let the generator choose 25% of patches, i.e. ``learned_fraction = 1/3`` of 75%.
    - Random slots: the remaining ``num_masked - num_learned`` are drawn uniformly among the
      patches the generator left, so every sample has exactly ``num_masked(L, ratio)``.
    - Straight-through: ``soft = softmax(y / tau)`` over the L patches and
      ``mask = hard + (soft - soft.detach())``. Forward, the bracket is exactly 0 so ``mask`` is
      exactly 0/1; backward, d mask_i / d logits = d soft_i / d logits for every patch i (masked
      at random or visible included). Gradient reaches ``logits`` only through ``mask`` multiplying
      the per-patch loss in ``masked_loss``: dL/dlogits_j = (1/tau) soft_j (c_j - sum_i soft_i c_i)
      with c_i = dL/dmask_i. The mask tokens entering the decoder do not depend on ``mask``.
    - ``learned_mask`` holds the learned slots alone with the same straight-through term, for the
      discriminator (compare it with ``random_rect_masks(..., count=num_learned(...))``).
    """
    if not tau > 0:
        raise ValueError(f"Gumbel-softmax temperature tau must be > 0, got {tau!r}")
    N, L = logits.shape
    k = num_masked(L, ratio)
    k_learned = num_learned(L, ratio, learned_fraction)
    if gumbel is None:
        gumbel = sample_gumbel((N, L), dtype=logits.dtype, device=logits.device, generator=generator)
    y = logits + gumbel                                            # [N, L]
    soft = torch.softmax(y / tau, dim=1)
    learned = _topk_indicator(y.detach(), k_learned)
    # Uniform keys with the learned patches pushed below every other: a uniform draw among the rest.
    u = torch.rand(N, L, dtype=logits.dtype, device=logits.device, generator=generator)
    rest = _topk_indicator(u.masked_fill(learned.bool(), -1.0), k - k_learned)
    straight_through = soft - soft.detach()                        # 0 forward, d soft backward
    return masking_from_hard(learned + rest, mask=learned + rest + straight_through,
                             learned_mask=learned + straight_through)


def box_patches(boxes: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """[N, 4] pixel boxes (x0, y0, x1, y1), x1/y1 exclusive -> [N, L] bool, True where the patch
    square overlaps the box with positive area (every patch holding a pixel of the box)."""
    gh, gw = grid
    p = patch_size
    cols = torch.arange(gw, device=boxes.device, dtype=boxes.dtype) * p   # patch left edges
    rows = torch.arange(gh, device=boxes.device, dtype=boxes.dtype) * p   # patch top edges
    x0, y0, x1, y1 = (boxes[:, i:i + 1] for i in range(4))               # each [N, 1]
    in_x = (cols < x1) & (cols + p > x0)                                  # [N, gw]
    in_y = (rows < y1) & (rows + p > y0)                                  # [N, gh]
    return (in_y[:, :, None] & in_x[:, None, :]).flatten(1)               # [N, gh * gw]


def object_prior_masking(boxes: Tensor, grid: tuple[int, int], patch_size: int, ratio: float,
                         beta: float, generator: torch.Generator | None = None) -> Masking:
    """AutoMAE Fig. 2 object prior: patches in the box are masked more often, exactly k per image.

    Weights: ``w = 1 + beta`` for patches overlapping the box (``box_patches``), ``1`` elsewhere.
    The k masked patches are a draw without replacement proportional to w (pick one with
    probability w_i / sum w, remove it, repeat), done in one shot as the top-k of
    ``log w + Gumbel`` (Gumbel-top-k). So for k = 1, P(i masked) = w_i / sum(w).
    """
    if not beta > -1:
        raise ValueError(f"object prior beta must be > -1 (weights 1 + beta > 0), got {beta!r}")
    inside = box_patches(boxes.float(), grid, patch_size)                 # [N, L] bool
    N, L = inside.shape
    log_w = torch.where(inside, math.log1p(beta), 0.0).to(torch.get_default_dtype())
    keys = log_w + sample_gumbel((N, L), dtype=log_w.dtype, device=log_w.device,
                                 generator=generator)
    return score_masking(keys, ratio)


def foreground_boxes(imgs: Tensor, threshold: float, background: str = "border") -> Tensor:
    """One box per image around its non-background pixels, for datasets without boxes.

    imgs [N, C, H, W] -> boxes [N, 4] float (x0, y0, x1, y1), x1/y1 exclusive: the bounding box
    of pixels where some channel has ``|value - background| > threshold``. ``background`` is
    ``"border"`` (per image and channel, the median of the one-pixel frame) or ``"zero"``. An image
    with no such pixel gets the full image (0, 0, W, H).
    """
    N, C, H, W = imgs.shape
    if background == "border":
        frame = torch.cat([imgs[:, :, 0, :], imgs[:, :, -1, :],
                           imgs[:, :, 1:-1, 0], imgs[:, :, 1:-1, -1]], dim=2)  # [N, C, 2W+2H-4]
        bg = frame.median(dim=2).values[:, :, None, None]                     # [N, C, 1, 1]
    elif background == "zero":
        bg = torch.zeros((), dtype=imgs.dtype, device=imgs.device)
    else:
        raise ValueError(f"background must be 'border' or 'zero', got {background!r}")
    fg = ((imgs - bg).abs() > threshold).any(dim=1)                           # [N, H, W]
    rows, cols = fg.any(dim=2), fg.any(dim=1)                                 # [N, H], [N, W]
    # argmax over a 0/1 tensor finds the first True; over the flipped tensor, the last one.
    y0 = rows.int().argmax(dim=1)
    y1 = H - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = W - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.get_default_dtype())
    full = torch.tensor([0.0, 0.0, W, H], dtype=boxes.dtype, device=boxes.device)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, full)


def random_rect_masks(N: int, grid: tuple[int, int], ratio: float | None, *,
                      count: int | None = None, aspect: tuple[float, float] = (1 / 3, 3.0),
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """AutoMAE's "real" masks for the discriminator: one object-like rectangle per sample.

    Returns [N, gh, gw] float 0/1 with exactly k ones, k = ``count`` if given (match it to the
    generator's learned count) else ``num_masked(gh * gw, ratio)``. Per sample: an aspect ratio
    log-uniform in ``aspect``, a rectangle of about k patches (h = round(sqrt(k a)),
    w = round(sqrt(k / a)), clipped to the grid) at a uniform position; then random patches
    outside it are added, or random patches inside it removed, until exactly k remain.
    """
    gh, gw = grid
    L = gh * gw
    k = count if count is not None else num_masked(L, ratio)
    if not 0 <= k <= L:
        raise ValueError(f"count must be in [0, {L}], got {k!r}")
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    u = torch.rand(N, 3, generator=generator, device=device).cpu()  # aspect, top, left
    rects = torch.zeros(N, gh, gw, device=device)
    for n in range(N):  # a few scalars per sample: shapes differ, so no batching to gain
        a = math.exp(lo + (hi - lo) * u[n, 0].item())
        h = min(gh, max(1, round(math.sqrt(k * a))))
        w = min(gw, max(1, round(math.sqrt(k / a))))
        top = int(u[n, 1].item() * (gh - h + 1))
        left = int(u[n, 2].item() * (gw - w + 1))
        rects[n, top:top + h, left:left + w] = 1.0
    rects = rects.flatten(1)                                              # [N, L]
    # Exact count: rank patches rectangle-first, each group in random order, and keep the top k.
    keys = rects + torch.rand(N, L, generator=generator, device=device) * 0.5
    return _topk_indicator(keys, k).view(N, gh, gw)


# -- self-guided masks: sampled by a score, optionally throwing the lowest-scored patches ----------

def patch_spread(imgs: Tensor, patch_size: int) -> Tensor:
    """A zero-cost patch score: the standard deviation of each patch's pixels (all channels),
    [N, C, H, W] -> [N, L] in the MAE's patch order (row-major). Flat background scores 0."""
    N, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)
    return x.float().std(dim=2, unbiased=False)


def num_thrown(L: int, throw: float) -> int:
    """Patches thrown out of both the encoder input and the loss: ``int(throw * L)``, leaving at
    least two (one visible, one masked)."""
    if not 0.0 <= throw < 1.0:
        raise ValueError(f"throw must be in [0, 1), got {throw!r}")
    n = int(throw * L + 1e-9)
    if L - n < 2:
        raise ValueError(f"throw {throw!r} leaves {L - n} of {L} patches; need at least two")
    return n


def masking_from_sets(masked: Tensor, thrown: Tensor) -> Masking:
    """A ``Masking`` from 0/1 [N, L] indicators of masked and thrown patches (disjoint, the same
    counts in every row); every other patch is visible. Thrown patches are neither given to the
    encoder nor reconstructed (``mask`` 0 there); the decoder puts mask tokens at them."""
    state = masked.detach() + 2 * thrown.detach()                  # 0 visible, 1 masked, 2 thrown
    if state.max() > 2 or not torch.all((state > 0).sum(1) == (state > 0).sum(1)[0]):
        raise ValueError("masked and thrown patches must be disjoint, with one count per row")
    keep = masked.shape[1] - int((state[0] > 0).sum())
    ids_shuffle = torch.sort(state, dim=1, stable=True).indices    # visible, masked, thrown
    return Masking(mask=masked, ids_keep=ids_shuffle[:, :keep],
                   ids_restore=torch.argsort(ids_shuffle, dim=1))


def guided_masking(scores: Tensor, ratio: float, *, random_share: float = 0.5,
                   temperature: float = 1.0, throw: float = 0.0, log_scores: bool = False,
                   generator: torch.Generator | None = None) -> Masking:
    """Masks sampled by a per-patch score [N, L] (AMT's attention-guided masking, HPM's
    predicted loss, or the pixel spread), as pure tensor code:

    - throw: the ``num_thrown(L, throw)`` lowest-scored patches of each image are thrown out
      (AMT's throwing: out of the encoder input and the loss; ties to the lower index);
    - of the L' patches left, exactly ``num_masked(L', ratio)`` = k are masked: the
      ``round((1 - random_share) k)`` guided ones drawn without replacement with probability
      ∝ score^(1/temperature) (Gumbel-top-k on log(score)/temperature; a patch with score 0
      only after every positive one), or with ``temperature=0`` the highest scores (HPM's
      hard patches; any real score), the rest uniformly among the kept patches left.

    ``log_scores``: ``scores`` are already log-scores (a masker's logits): drawn ∝
    exp(score/temperature). No gradient flows into the scores: the selection is a draw.
    """
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    s = scores.detach().float()
    N, L = s.shape
    n_throw = num_thrown(L, throw)
    k = num_masked(L - n_throw, ratio)
    k_guided = int(round((1.0 - random_share) * k))
    # thrown: the lowest scores (a stable ascending sort of the negated index order)
    thrown = _topk_indicator(-s, n_throw) if n_throw else torch.zeros_like(s)
    if temperature == 0:
        keys = s
    else:
        logs = (s if log_scores else torch.log(s.clamp_min(0.0))).div(temperature)  # -inf: 0
        keys = logs + sample_gumbel((N, L), dtype=s.dtype, device=s.device, generator=generator)
        keys = torch.where(torch.isfinite(keys), keys, torch.full_like(keys, -1e30))
    guided = _topk_indicator(keys.masked_fill(thrown.bool(), -float("inf")), k_guided)
    u = torch.rand(N, L, dtype=s.dtype, device=s.device, generator=generator)
    rest = _topk_indicator(u.masked_fill((guided + thrown).bool(), -1.0), k - k_guided)
    return masking_from_sets((guided + rest).to(torch.get_default_dtype()),
                             thrown.to(torch.get_default_dtype()))


def mask_agreement(mask: Tensor) -> Tensor:
    """How alike a batch's masks [N, L] are: mean_j |freq_j - k| / (2k(1 - k)) with freq_j the
    share of the batch masking patch j and k the masked share of an image, clamped at 1; about
    0 when masks are independent of the image, 1 when every image gets the same mask. (Thrown
    patches count as unmasked: background thrown alike in every image raises it.)"""
    mask = mask.detach().float()
    freq = mask.mean(dim=0)
    k = mask[0].sum() / mask.shape[1]
    return ((freq - k).abs().mean() / (2 * k * (1 - k))).clamp(max=1.0)
