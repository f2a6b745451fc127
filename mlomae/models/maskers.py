"""Masking networks: per-patch scores from which a ``masking`` function picks the masked patches.

MLO-MAE maskers return probabilities [N, L] in (0, 1) (``forward``) and expose ``logits``; feed
the probabilities to ``prob_topk_masking``. The AutoMAE generator returns logits [N, L] for
``gumbel_topk_masking``; ``sigmoid`` of them serves MLO-MAE's mode too, which is how one
generator can take both the downstream hypergradient and the adversarial loss.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mlomae.models.attention import block_attention
from mlomae.models.mae import sincos_pos_embed

__all__ = ["PatchMLPMasker", "SharedPatchMasker", "PixelMasker", "AttentionMaskGenerator"]

_norm = partial(nn.LayerNorm, eps=1e-6)


class PatchMLPMasker(nn.Module):
    """MLO-MAE's masking network: an MLP over the flattened patch embeddings, a sigmoid per patch.

    Input: patch embeddings [N, L, D], e.g. ``MaskedAutoencoder.embed_patches(imgs)``. Whether
    the masker's loss also trains the MAE's patch embedding is the caller's choice: pass
    ``embed_patches(imgs).detach()`` to cut that path (the official code does not cut it).

    Size: the first layer alone has L * D * hidden_dim weights; at CIFAR size with ViT-B
    (L = 64 patches of 4 px, D = 768) and hidden_dim = 2048 that is 64 * 768 * 2048 = 101M,
    more than the ViT-B encoder itself. ``SharedPatchMasker`` is the parameter-efficient option.
    """

    def __init__(self, num_patches: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.num_patches, self.embed_dim = num_patches, embed_dim
        self.fc1 = nn.Linear(num_patches * embed_dim, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_patches)
        nn.init.zeros_(self.fc2.bias)   # start near probability 1/2 everywhere

    def logits(self, x: Tensor) -> Tensor:
        """[N, L, D] -> [N, L]."""
        if x.shape[1:] != (self.num_patches, self.embed_dim):
            raise ValueError(f"expected patch embeddings [N, {self.num_patches}, "
                             f"{self.embed_dim}], got {tuple(x.shape)}")
        return self.fc2(self.act(self.fc1(x.flatten(1))))   # [N, L*D] -> [N, hidden] -> [N, L]

    def forward(self, x: Tensor) -> Tensor:
        """Masking probabilities [N, L] in (0, 1)."""
        return torch.sigmoid(self.logits(x))


class SharedPatchMasker(nn.Module):
    """One small MLP applied to every patch token, optionally after ``depth`` transformer blocks.

    Parameters do not grow with L. With ``depth = 0`` each patch is scored from its own embedding
    (plus its position, already in the embedding); blocks let a patch see the others first.
    Input and gradient conventions as ``PatchMLPMasker``.

    ``center``: subtract each image's mean logit. One MLP scores every patch, so a shift of its
    output moves every probability at once; that common shift is the lever the downstream
    hypergradient found in the study (benchmarks/RESULTS.md). Centred, the logits of an image
    average 0 and the masker can only rank patches against each other.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, depth: int = 0, num_heads: int = 4,
                 mlp_ratio: float = 4.0, center: bool = False):
        super().__init__()
        self.center = center
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm)
            for _ in range(depth)])
        self.norm = _norm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, 1)
        nn.init.zeros_(self.fc2.bias)

    def logits(self, x: Tensor) -> Tensor:
        """[N, L, D] -> [N, L]."""
        for blk in self.blocks:
            x = blk(x)
        logits = self.fc2(self.act(self.fc1(self.norm(x)))).squeeze(-1)   # [N, L, 1] -> [N, L]
        return logits - logits.mean(dim=1, keepdim=True) if self.center else logits

    def forward(self, x: Tensor) -> Tensor:
        """Masking probabilities [N, L] in (0, 1)."""
        return torch.sigmoid(self.logits(x))


class PixelMasker(nn.Module):
    """A masker that reads images through its own patch embedding, independent of the MAE.

    Its own ``PatchEmbed`` plus fixed sin-cos positions, then a ``SharedPatchMasker``.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 hidden_dim: int, depth: int = 0, num_heads: int = 4):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches: int = self.patch_embed.num_patches
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid_size)[None])
        self.scorer = SharedPatchMasker(embed_dim, hidden_dim, depth, num_heads)

    def logits(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L]."""
        return self.scorer.logits(self.patch_embed(imgs) + self.pos_embed)   # [N, L, D] in

    def forward(self, imgs: Tensor) -> Tensor:
        """Masking probabilities [N, L] in (0, 1)."""
        return torch.sigmoid(self.logits(imgs))


class AttentionMaskGenerator(nn.Module):
    """AutoMAE's mask generator: a ViT's last-block CLS->patch attention, then a small conv head.

    The ViT (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``: timm's names) is its
    own; AutoMAE used a pretrained one, frozen: ``pretrained`` is a local file of ViT weights
    (``mlomae export``'s safetensors of a random-mask MAE run, or any timm ``VisionTransformer``
    state dict saved as safetensors or a weights-only torch file; nothing is downloaded) loaded
    into the backbone, and ``freeze`` stops its parameters training (``backbone_parameters()``
    lists them). The conv head maps the [N, heads, gh, gw] attention maps to patch logits [N, L]:
    3x3 convolutions through ``conv_channels`` with ReLU, and a last 3x3 convolution to 1 channel.
    Only the last block's ``norm1`` and ``qkv`` are read there; its value path and MLP get no
    gradient (kept so the block stays a timm ``Block`` for loading weights).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, conv_channels: tuple[int, ...] = (32, 32), mlp_ratio: float = 4.0,
                 pretrained: str | None = None, freeze: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"the generator needs at least one block for attention maps, got depth={depth}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches: int = self.patch_embed.num_patches
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid_size, True)[None])
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm)
            for _ in range(depth)])
        layers: list[nn.Module] = []
        chans = (num_heads, *conv_channels)
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(chans[-1], 1, 3, padding=1))
        self.head = nn.Sequential(*layers)
        if pretrained:
            self.load_backbone(pretrained)
        if freeze:
            for p in self.backbone_parameters():
                p.requires_grad_(False)

    def load_backbone(self, path: str) -> None:
        """Load ViT weights from a local safetensors or weights-only torch file: every backbone
        tensor must be there with its shape (a timm ViT's ``norm``/``head``/``fc_norm`` and any
        further blocks are ignored); ``pos_embed`` stays the fixed sin-cos buffer (an MAE's
        export holds the same one)."""
        import os
        if not os.path.isfile(path):
            raise ValueError(f"pretrained weights not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        missing = [k for k in own if k not in state and k != "pos_embed"]
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or wrong:
            raise ValueError(f"{path} does not fit the generator's ViT: "
                             + "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else [])
                                         + ([f"shape {', '.join(wrong[:3])}"] if wrong else [])))
        with torch.no_grad():
            for k, v in own.items():
                if k != "pos_embed":
                    v.copy_(state[k])

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The ViT's parameters (everything but the conv head): what a caller freezes."""
        return (p for name, p in self.named_parameters() if not name.startswith("head."))

    def attention_maps(self, imgs: Tensor) -> Tensor:
        """CLS->patch attention of the last block: [N, heads, gh, gw] (rows sum to <= 1: the
        CLS token's attention to itself is dropped)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]       # [N, L, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)                              # [N, 1 + L, D]
        for blk in self.blocks[:-1]:
            x = blk(x)
        attn = block_attention(self.blocks[-1], x)                  # [N, heads, 1 + L, 1 + L]
        return attn[:, :, 0, 1:].reshape(x.shape[0], self.num_heads, *self.grid_size)

    def logits_from_attention(self, attn_maps: Tensor) -> Tensor:
        """[N, heads, gh, gw] -> patch logits [N, L] (row-major, as the MAE's patches)."""
        return self.head(attn_maps).flatten(1)                      # [N, 1, gh, gw] -> [N, L]

    def forward(self, imgs: Tensor) -> Tensor:
        """Patch logits [N, L] for ``gumbel_topk_masking``."""
        return self.logits_from_attention(self.attention_maps(imgs))
