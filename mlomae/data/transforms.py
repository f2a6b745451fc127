"""Transforms over whole batches, on whatever device the batch is on.

A transform is called as ``transform(x, generator)`` with ``x`` a uint8 ``[B, C, H, W]`` batch
(or float in [0, 1]) and returns float ``[B, C', S, S]``. Every random number comes from
``generator`` (a CPU ``torch.Generator`` the loader seeds from (seed, epoch, step, rank)), so a
resumed run sees the same augmentation as an uninterrupted one.

The random-resized crop and the flip are one affine ``grid_sample`` per batch (bilinear), with
the crop box and ratio drawn as in torchvision's RandomResizedCrop (10 tries, then the centre
crop), but with real-valued boxes instead of whole pixels.

Defaults (``pretrain_transform``):
- natural images (CIFAR, ImageNet, folders): MAE's recipe, crop scale (0.2, 1), ratio (3/4, 4/3),
  horizontal flip.
- small grayscale images (1 channel, at most 32 px: Fashion-MNIST, MNIST): a light version,
  crop scale (0.6, 1), because at 28 px a 20% crop keeps too little of a centred garment to
  reconstruct; flip only where the dataset allows it (``meta.hflip``: clothes yes, digits no).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlomae.data.base import DatasetMeta, to_float_image
from mlomae.errors import ConfigError

NATURAL_SCALE = (0.2, 1.0)
LIGHT_SCALE = (0.6, 1.0)
RATIO = (3 / 4, 4 / 3)


@dataclass
class BatchTransform:
    """Random-resized crop + flip (``train``) or resize + centre crop (eval), then normalise."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool
    scale: tuple[float, float] = NATURAL_SCALE
    ratio: tuple[float, float] = RATIO
    hflip: bool = True
    crop_pct: float | None = None
    channels: int | None = None  # 3 repeats a grayscale channel for models that expect RGB
    normalize: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_float_image(x)  # [B, C, H, W] in [0, 1]
        if self.train:
            x = random_resized_crop(x, self.size, self.scale, self.ratio, self.hflip, generator)
        else:
            x = resize_center_crop(x, self.size, self.crop_pct)
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        if self.channels is not None and self.channels != x.shape[1]:
            if x.shape[1] != 1:
                raise ConfigError(f"cannot turn {x.shape[1]}-channel images into "
                                  f"{self.channels} channels", key="data.channels",
                                  value=self.channels)
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


def _check_image_meta(meta: DatasetMeta) -> None:
    if meta.task != "classification" or meta.channels is None:
        raise ConfigError(f"dataset '{meta.name}' holds no images: image transforms do not apply",
                          key="data.dataset", value=meta.name)


def pretrain_transform(meta: DatasetMeta, img_size: int, *, scale: tuple[float, float] | None = None,
                       ratio: tuple[float, float] = RATIO, hflip: bool | None = None,
                       channels: int | None = None, normalize: bool = True) -> BatchTransform:
    """MAE-style augmentation (see the module doc for the defaults per kind of dataset)."""
    _check_image_meta(meta)
    small_gray = meta.channels == 1 and meta.image_size is not None and max(meta.image_size) <= 32
    if scale is None:
        scale = LIGHT_SCALE if small_gray else NATURAL_SCALE
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError("crop scale must satisfy 0 < low <= high <= 1", key="data.scale",
                          value=scale)
    return BatchTransform(img_size, meta.mean, meta.std, train=True, scale=tuple(scale),
                          ratio=tuple(ratio), hflip=meta.hflip if hflip is None else hflip,
                          channels=channels, normalize=normalize)


def eval_transform(meta: DatasetMeta, img_size: int, *, crop_pct: float | None = None,
                   channels: int | None = None, normalize: bool = True) -> BatchTransform:
    """Resize the shorter side to img_size / crop_pct, centre-crop img_size, normalise.

    ``crop_pct`` defaults to 0.875 (ImageNet's 256 -> 224) when the stored images are larger than
    ``img_size`` and 1.0 otherwise, so 28 px images at img_size 28 pass through untouched.
    """
    _check_image_meta(meta)
    return BatchTransform(img_size, meta.mean, meta.std, train=False, crop_pct=crop_pct,
                          channels=channels, normalize=normalize)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], hflip: bool,
                        generator: torch.Generator | None) -> torch.Tensor:
    """One crop box (and flip) per image, resampled to ``size`` x ``size``: [B,C,H,W] -> [B,C,S,S]."""
    b, _, h, w = x.shape
    tries = 10
    u = torch.rand(b, tries, 4, generator=generator, dtype=torch.float64)  # area, ratio, x0, y0
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    cw, ch = torch.sqrt(area * torch.exp(log_r)), torch.sqrt(area / torch.exp(log_r))
    ok = (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    # Fallback as torchvision: the whole image, cut to the nearest allowed ratio, centred.
    in_ratio = w / h
    fw, fh = (w, w / ratio[0]) if in_ratio < ratio[0] else (
        (h * ratio[1], h) if in_ratio > ratio[1] else (w, h))
    rows = torch.arange(b)
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, cw[rows, pick], torch.full((b,), float(fw), dtype=torch.float64))
    ch = torch.where(first >= 0, ch[rows, pick], torch.full((b,), float(fh), dtype=torch.float64))
    x0 = torch.where(first >= 0, u[rows, pick, 2] * (w - cw), (w - cw) / 2)
    y0 = torch.where(first >= 0, u[rows, pick, 3] * (h - ch), (h - ch) / 2)
    flip = (torch.rand(b, generator=generator) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    # Output coords in [-1, 1] map onto the box: x_in = sx * x_out + cx (align_corners=False).
    sx, sy = cw / w, ch / h
    cx, cy = (2 * x0 + cw) / w - 1, (2 * y0 + ch) / h - 1
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [b, x.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(x: torch.Tensor, size: int, crop_pct: float | None = None) -> torch.Tensor:
    """Shorter side to round(size / crop_pct) (antialiased), then the centre size x size square."""
    h, w = x.shape[-2:]
    if crop_pct is None:
        crop_pct = 0.875 if min(h, w) > size else 1.0
    short = round(size / crop_pct)
    if min(h, w) != short:
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else \
            (max(short, round(h * short / w)), short)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=short < min(h, w))
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]
