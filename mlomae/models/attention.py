"""Small helpers around timm's attention: switch its fused kernel, read its attention maps."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

__all__ = ["set_fused_attention", "fused_attention", "attention_probs", "block_attention"]


def set_fused_attention(module: nn.Module, enabled: bool) -> dict[nn.Module, bool]:
    """Set ``fused_attn`` on every timm attention inside ``module``; return the previous flags.

    timm's fused path calls ``F.scaled_dot_product_attention``, whose CPU kernel has no double
    backward; second-order hypergradient methods need the plain ``softmax(q k^T) v`` path.
    Only modules that exist now change; ones built later take timm's global default
    (``timm.layers.set_fused_attn``).
    """
    previous = {}
    for m in module.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            previous[m] = m.fused_attn
            m.fused_attn = enabled
    return previous


@contextmanager
def fused_attention(module: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Within the block, every timm attention in ``module`` runs fused (or not); flags restored
    on exit, exceptions included. ``with fused_attention(mae, False): ...double backward...``"""
    previous = set_fused_attention(module, enabled)
    try:
        yield module
    finally:
        for m, flag in previous.items():
            m.fused_attn = flag


def attention_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention of a timm ``Attention`` on its input x [N, T, D] -> [N, heads, T, T].

    Recomputes q and k from the module's own ``qkv`` (and q/k norms) rather than patching its
    forward, so it works whichever kernel the module uses.
    """
    N, T, _ = x.shape
    qkv = attn.qkv(x).reshape(N, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])             # each [N, heads, T, head_dim]
    return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


def block_attention(block: Block, x: Tensor) -> Tensor:
    """Attention maps [N, heads, T, T] of a timm ``Block`` on its input tokens x [N, T, D]."""
    return attention_probs(block.attn, block.norm1(x))
