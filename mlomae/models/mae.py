"""Masked autoencoder: a ViT encoder over visible patches and a lighter decoder over all of them.

The encoder's parameter names are timm ``VisionTransformer``'s (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N``, ``norm``), so dropping the ``decoder_*`` and
``mask_token`` keys leaves a state dict that ``VisionTransformer(..., global_pool='token')`` loads
strictly. Which patches are masked is decided outside, by a ``Masking`` (see ``masking.py``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mlomae.models.attention import fused_attention, set_fused_attention
from mlomae.models.masking import Masking

__all__ = ["MaskedAutoencoder", "sincos_pos_embed", "fused_attention", "set_fused_attention"]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: sin then cos of pos * omega_i, omega_i = 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]        # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> Tensor:
    """Fixed 2D sin-cos position embedding [L (+1), D] for a (gh, gw) patch grid in row-major order.

    The first D/2 channels encode the column, the last D/2 the row, each as ``_sincos_1d``;
    with ``cls_token`` a zero row is prepended (the class token has no position).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.flatten()),
                     _sincos_1d(embed_dim // 2, rows.flatten())], dim=1)   # [L, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class MaskedAutoencoder(nn.Module):
    """MAE with a timm-compatible ViT encoder; position embeddings are fixed buffers.

    Buffers rather than frozen parameters keep ``parameters()`` to what an optimizer or a
    hypergradient should touch, and still appear in the state dict under timm's names.
    """

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1,
                 embed_dim: int = 128, depth: int = 4, num_heads: int = 4,
                 decoder_embed_dim: int = 64, decoder_depth: int = 2, decoder_num_heads: int = 4,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True, loss_predictor: bool = False):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)   # timm's ViT default: keeps export exact
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss

        # encoder: timm VisionTransformer's names at the top level
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches: int = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid_size, True)[None])
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder: everything prefixed decoder_, plus MAE's mask_token
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed(decoder_embed_dim, self.grid_size, True)[None])
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        # HPM-style: a light head that predicts each patch's reconstruction loss from its patch
        # embedding (decoder_ prefix: dropped by the timm export like the rest of the decoder)
        self.decoder_loss_pred = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, decoder_embed_dim), nn.GELU(),
            nn.Linear(decoder_embed_dim, 1)) if loss_predictor else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The patch projection is a linear map of a flattened patch: initialise it like one.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- pixels <-> patches ----------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch flattened as (row, col, channel)."""
        p, (gh, gw) = self.patch_size, self.grid_size
        x = imgs.reshape(imgs.shape[0], self.in_chans, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], gh * gw, p * p * self.in_chans)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[N, L, p*p*C] -> [N, C, H, W], the inverse of ``patchify``."""
        p, (gh, gw) = self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, self.in_chans)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.in_chans, gh * p, gw * p)

    # ---- encoder ----------------------------------------------------------------------------
    def embed_patches(self, imgs: Tensor) -> Tensor:
        """Patch embedding plus position, no class token: [N, L, D]. What a masker may read."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _prepend_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)                          # [N, 1 + T, D]

    def forward_encoder(self, imgs: Tensor, masking: Masking) -> Tensor:
        """Encode only the visible patches: latent [N, 1 + L_keep, D]."""
        x = self.embed_patches(imgs)                               # [N, L, D]
        ids = masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, dim=1, index=ids)                      # [N, L_keep, D]
        x = self._prepend_cls(x)                                   # [N, 1 + L_keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # ---- decoder ----------------------------------------------------------------------------
    def forward_decoder(self, latent: Tensor, masking: Masking) -> Tensor:
        """Predict every patch's pixels from the visible latent: [N, L, p*p*C]."""
        x = self.decoder_embed(latent)                             # [N, 1 + L_keep, Dd]
        N, L = masking.ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L - (x.shape[1] - 1), -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)          # [N, L, Dd], shuffled order
        ids = masking.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x_ = torch.gather(x_, dim=1, index=ids)                    # [N, L, Dd], patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))                # [N, 1 + L, p*p*C]
        return x[:, 1:, :]

    # ---- losses -----------------------------------------------------------------------------
    def patch_loss(self, imgs: Tensor, pred: Tensor) -> Tensor:
        """Per-patch mean squared error [N, L] against (per-patch normalised) pixels."""
        target = self.patchify(imgs)                               # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred - target) ** 2).mean(dim=-1)

    def masked_loss(self, per_patch: Tensor, masking: Masking) -> Tensor:
        """``sum(loss * mask * w) / sum(mask.detach())`` over the batch; w = ``weights`` or 1.

        The numerator keeps ``mask`` (its straight-through gradient is the AutoMAE generator's
        path) and ``weights`` (MLO-MAE's mask probabilities, the masker's path); the denominator
        is the count of masked patches, a constant, so neither path is rescaled by it.
        """
        w = masking.mask if masking.weights is None else masking.mask * masking.weights
        return (per_patch * w).sum() / masking.mask.detach().sum()

    def forward(self, imgs: Tensor, masking: Masking) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss, pred [N, L, p*p*C], per-patch loss [N, L])."""
        pred = self.forward_decoder(self.forward_encoder(imgs, masking), masking)
        per_patch = self.patch_loss(imgs, pred)
        return self.masked_loss(per_patch, masking), pred, per_patch

    def predict_patch_loss(self, imgs: Tensor) -> Tensor:
        """[N, L]: the loss predictor's score of each patch (higher: harder to reconstruct), from
        the patch embeddings with their gradient cut (only the predictor learns from it)."""
        if self.decoder_loss_pred is None:
            raise ValueError("this MaskedAutoencoder has no loss predictor: build it with "
                             "loss_predictor=True")
        return self.decoder_loss_pred(self.embed_patches(imgs).detach()).squeeze(-1)

    @torch.no_grad()
    def cls_attention(self, imgs: Tensor) -> Tensor:
        """[N, L]: the last block's attention of the class token to each patch on the unmasked
        image, averaged over heads (AMT's masking score); no gradient."""
        from mlomae.models.attention import block_attention
        x = self._prepend_cls(self.embed_patches(imgs))            # [N, 1 + L, D]
        for blk in self.blocks[:-1]:
            x = blk(x)
        return block_attention(self.blocks[-1], x)[:, :, 0, 1:].mean(dim=1)

    # ---- features for probes and heads ------------------------------------------------------
    def forward_features(self, imgs: Tensor) -> Tensor:
        """Unmasked encoding, every token after the final norm: [N, 1 + L, D] (timm's
        ``VisionTransformer.forward_features``)."""
        x = self._prepend_cls(self.embed_patches(imgs))            # [N, 1 + L, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    @staticmethod
    def pool(tokens: Tensor, pool: str = "cls") -> Tensor:
        """[N, 1 + L, D] -> [N, D]: the class token, or the mean of the patch tokens."""
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)

    def features(self, imgs: Tensor, pool: str = "cls") -> Tensor:
        """Unmasked encoding pooled to [N, D] (``pool`` of ``forward_features``); ``cls`` equals
        timm's ``VisionTransformer`` with no head."""
        return self.pool(self.forward_features(imgs), pool)
