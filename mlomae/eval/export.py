"""Export a MaskedAutoencoder's encoder for timm.

The encoder's keys already are timm ``VisionTransformer``'s; export drops the decoder
(``decoder_*``, ``mask_token``) and writes a safetensors state dict plus a JSON sidecar with the
constructor arguments, so that

    kwargs = json.load(open("encoder.json"))["timm_kwargs"]
    vit = timm.models.vision_transformer.VisionTransformer(**kwargs)
    vit.load_state_dict(safetensors.torch.load_file("encoder.safetensors"), strict=True)

loads with no missing or unexpected keys, and ``vit(x)`` equals ``features(x, pool)``
(``pool: cls`` -> ``global_pool='token'``; ``mean`` -> ``global_pool='avg', fc_norm=False``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MlomaeError
from ..tracking import atomic_write_text

DECODER_PREFIXES = ("decoder_", "mask_token")


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm's names (contiguous CPU copies, as safetensors wants)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith(DECODER_PREFIXES)}


def timm_kwargs(model: nn.Module, pool: str = "cls") -> dict[str, Any]:
    """``VisionTransformer`` constructor arguments matching ``model``'s encoder."""
    if pool not in ("cls", "mean"):
        raise MlomaeError(f"pool must be 'cls' or 'mean', got {pool!r}")
    needed = ("patch_embed", "blocks", "cls_token", "norm")
    if not all(hasattr(model, a) for a in needed):
        raise MlomaeError(f"{type(model).__name__} is not a ViT encoder with timm's names "
                          f"({', '.join(needed)}); export supports MaskedAutoencoder")
    pe, blk = model.patch_embed, model.blocks[0]
    embed_dim = int(model.cls_token.shape[-1])
    img = pe.img_size
    patch = pe.patch_size
    kw: dict[str, Any] = {
        "img_size": list(img) if img[0] != img[1] else int(img[0]),
        "patch_size": list(patch) if patch[0] != patch[1] else int(patch[0]),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": 0,
        "embed_dim": embed_dim,
        "depth": len(model.blocks),
        "num_heads": int(blk.attn.num_heads),
        "mlp_ratio": blk.mlp.fc1.out_features / embed_dim,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "global_pool": "token" if pool == "cls" else "avg",
    }
    if pool == "mean":
        kw["fc_norm"] = False   # MAE-style mean pooling after the final norm, as features
    return kw


def export_timm(model: nn.Module, out: str | os.PathLike, pool: str = "cls",
                extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``out`` (safetensors) and its sidecar ``<out without .safetensors>.json``."""
    from safetensors.torch import save_file
    out = Path(out)
    kwargs = timm_kwargs(model, pool)
    tensors = encoder_state_dict(model)
    sidecar = out.with_suffix(".json") if out.suffix == ".safetensors" else Path(f"{out}.json")
    info = {"format": "timm", "class": "timm.models.vision_transformer.VisionTransformer",
            "timm_kwargs": kwargs, "pool": pool, **(extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"mlomae": json.dumps(info)})
    os.replace(tmp, out)
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    return out, sidecar


def load_timm(path: str | os.PathLike) -> nn.Module:
    """The exported encoder as a timm ``VisionTransformer`` in eval mode (strict load)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {})["mlomae"])
    vit = VisionTransformer(**info["timm_kwargs"])
    vit.load_state_dict(load_file(str(path)), strict=True)
    return vit.eval()
