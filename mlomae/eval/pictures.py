"""Pictures of a run (matplotlib, Agg, PNG): masks and reconstructions, how often each patch is
masked, and training curves. Every figure has a fixed size in inches and a fixed dpi, so its
PNG's size in pixels is known in advance (``*_px`` functions).

Masks come from the run's pretraining problem when it draws them: a problem with
``reconstruct(imgs)`` (``.pred`` and ``.masking``) or ``masking_for(imgs) -> Masking``; otherwise
uniform random masks at ratio 0.75 through the MAE (and a warning says so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..errors import MlomaeError  # noqa: E402
from ..tracking import warn  # noqa: E402

DPI = 100
CELL = 1.5            # inches per image in the grid
HEAT = (4.5, 4.0)     # inches
CURVE = (4.0, 3.0)    # inches per problem
RANDOM_RATIO = 0.75


def grid_px(num: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid of ``num`` images: 3 columns of CELL inches."""
    return round(3 * CELL * DPI), round(num * CELL * DPI)


def heatmap_px() -> tuple[int, int]:
    return round(HEAT[0] * DPI), round(HEAT[1] * DPI)


def curves_px(num_problems: int) -> tuple[int, int]:
    return round(num_problems * CURVE[0] * DPI), round(CURVE[1] * DPI)


# -- masks and reconstructions --------------------------------------------------------------

def is_mae(m: Any) -> bool:
    return all(callable(getattr(m, a, None)) for a in
               ("forward_encoder", "forward_decoder", "patchify", "unpatchify"))


def find_masker(built) -> tuple[Any, Any]:
    """(problem that draws masks or None, the MAE that reconstructs)."""
    problem = next((p for p in built.problems.values()
                    if callable(getattr(p, "reconstruct", None))), None)
    problem = problem or next((p for p in built.problems.values()
                               if callable(getattr(p, "masking_for", None))), None)
    mae = problem.module if problem is not None and is_mae(problem.module) else None
    mae = mae or next((m for m in built.models.values() if is_mae(m)), None)
    if mae is None:
        raise MlomaeError("no model of the run is a masked autoencoder (forward_encoder, "
                          "forward_decoder, patchify, unpatchify): nothing to draw masks with")
    return problem, mae


def patches_to_images(mae, imgs: Tensor, pred: Tensor) -> Tensor:
    """Predicted patches [N, L, p*p*C] -> images [N, C, H, W] in the input's (normalised) space;
    with ``norm_pix_loss`` each patch is mapped back with the true patch's mean and variance."""
    if getattr(mae, "norm_pix_loss", False):
        target = mae.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    return mae.unpatchify(pred)


@torch.no_grad()
def mae_reconstruct(mae, imgs: Tensor, masking) -> Tensor:
    """The MAE's reconstruction [N, C, H, W] of ``imgs`` under ``masking``."""
    pred = mae.forward_decoder(mae.forward_encoder(imgs, masking), masking)   # [N, L, p*p*C]
    return patches_to_images(mae, imgs, pred)


@torch.no_grad()
def masks_and_reconstructions(built, imgs: Tensor, say: bool = True) -> tuple[Tensor, Tensor]:
    """(mask [N, L] with 1 = hidden from the encoder, reconstruction [N, C, H, W]) for a batch
    of images: hidden is masked, or thrown out by ``throw`` (neither seen nor reconstructed).

    A problem's ``reconstruct(imgs)`` may return an object with ``.pred`` (patches or images)
    and ``.masking`` (``problems.pretrain.Reconstructed``) or a pair ``(pred, masking)``.
    """
    from ..models.masking import random_masking
    problem, mae = find_masker(built)
    modules = list(built.models.values())
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        if problem is not None and callable(getattr(problem, "reconstruct", None)):
            out = problem.reconstruct(imgs)
            pred, masking = (out.pred, out.masking) if hasattr(out, "masking") else out
            if pred.ndim == 3:
                pred = patches_to_images(mae, imgs, pred)
        else:
            if problem is not None:
                masking = problem.masking_for(imgs)
            else:
                if say:
                    warn("no problem of the run draws masks (masking_for); drawing uniform "
                         f"random masks at ratio {RANDOM_RATIO}")
                masking = random_masking(imgs.shape[0], mae.num_patches, RANDOM_RATIO,
                                         device=imgs.device)
            pred = mae_reconstruct(mae, imgs, masking)
    finally:
        for m, t in zip(modules, modes):
            m.train(t)
    hidden = torch.ones(masking.mask.shape, device=masking.mask.device)
    hidden.scatter_(1, masking.ids_keep, 0.0)   # = mask where nothing is thrown
    return hidden, pred.detach()


def _patch_mask_image(mask: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """[N, L] patch mask -> [N, 1, H, W] pixel mask."""
    gh, gw = grid
    m = mask.view(-1, 1, gh, gw)
    return torch.nn.functional.interpolate(m, size=size, mode="nearest")


def _display(x: Tensor, meta) -> np.ndarray:
    """Normalised [N, C, H, W] -> [N, H, W, C] in [0, 1] for imshow."""
    mean = torch.tensor(meta.mean or (0.0,), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std or (1.0,), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def draw_grid(imgs: Tensor, mask: Tensor, recon: Tensor, grid: tuple[int, int], meta,
              path: Path) -> tuple[int, int]:
    """One row per image: the image, its masked patches greyed out, the reconstruction with the
    visible patches pasted back (as MAE shows it)."""
    m = _patch_mask_image(mask, grid, tuple(imgs.shape[-2:]))                 # [N, 1, H, W]
    shown = _display(imgs, meta)
    pasted = _display(imgs * (1 - m) + recon * m, meta)
    grey = m.permute(0, 2, 3, 1).cpu().numpy()
    masked = shown * (1 - grey) + 0.5 * grey
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(3 * CELL, n * CELL), dpi=DPI, squeeze=False)
    for i in range(n):
        for j, (img, title) in enumerate(((shown[i], "image"), (masked[i], "masked"),
                                          (pasted[i], "reconstruction"))):
            ax = axes[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.3 / (n * CELL),
                        wspace=0.05, hspace=0.05)
    return _save(fig, path)


def draw_heatmap(freq: np.ndarray, path: Path, title: str) -> tuple[int, int]:
    """``freq`` [gh, gw]: the share of images in which each patch position is masked."""
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=HEAT, dpi=DPI)
    im = ax.imshow(freq, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of images masked")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _save(fig, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue   # a line cut by a crash
    return out


def draw_curves(records: list[dict[str, Any]], problems: list[str], path: Path) -> tuple[int, int]:
    """One panel per problem: its mean loss per logging interval (and ``val_loss`` if logged)
    against the outer step."""
    from matplotlib.ticker import MaxNLocator
    n = max(1, len(problems))
    fig, axes = plt.subplots(1, n, figsize=(n * CURVE[0], CURVE[1]), dpi=DPI, squeeze=False)
    for ax, p in zip(axes[0], problems):
        for key, style in ((f"{p}/loss", "-"), (f"{p}/val_loss", "--")):
            pts = [(r["step"], r[key]) for r in records if key in r and "step" in r
                   and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=key.split("/", 1)[1])
                if min(ys) > 0 and max(ys) / min(ys) > 20:
                    ax.set_yscale("log")
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("outer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> tuple[int, int]:
    """Save at the figure's own size (no tight bbox: the pixel size stays what was set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    w, h = fig.get_size_inches() * DPI
    plt.close(fig)
    return round(w), round(h)


def first_images(built, role: str, n: int) -> Tensor:
    from .features import loader_for, role_items
    items = role_items(built, role)[:n]
    x, _ = next(iter(loader_for(built, role, items, len(items))))
    return x


def make_pictures(built, run_dir: Path, out_dir: Path, num: int = 8, role: str = "test",
                  heat_images: int = 256) -> dict[str, Path]:
    """Draw the three pictures into ``out_dir``; returns name -> file."""
    if built.data is None or role not in built.data.indices:
        raise MlomaeError(f"the run has no '{role}' split to draw images from")
    if num < 1:
        raise MlomaeError(f"--num must be at least 1 (got {num})")
    out: dict[str, Path] = {}
    _, mae = find_masker(built)
    grid = tuple(mae.grid_size) if hasattr(mae, "grid_size") else (int(math.isqrt(mae.num_patches)),) * 2
    with torch.random.fork_rng(devices=[]):   # the same masks every time for the same run
        torch.manual_seed(built.cfg["seed"])
        imgs = first_images(built, role, num)
        mask, recon = masks_and_reconstructions(built, imgs)
        out["masks"] = out_dir / "masks.png"
        draw_grid(imgs, mask, recon, grid, built.data.meta, out["masks"])
        batch = first_images(built, role, heat_images)
        freq, _ = masks_and_reconstructions(built, batch, say=False)
    freq = freq.mean(0).view(*grid).cpu().numpy()
    out["mask_heatmap"] = out_dir / "mask_heatmap.png"
    draw_heatmap(freq, out["mask_heatmap"], f"how often each patch is masked\n({batch.shape[0]} {role} "
                                            f"images, mean {freq.mean():.2f})")
    records = read_metrics(run_dir / "metrics.jsonl")
    out["curves"] = out_dir / "curves.png"
    draw_curves(records, list(built.problems), out["curves"])
    return out
