"""Classification heads on pooled encoder features [N, D]."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LinearHead", "MLPHead"]


class LinearHead(nn.Module):
    """A linear classifier; with ``norm`` a BatchNorm without affine parameters first.

    The normalisation is MAE's linear probe: it rescales features whose magnitudes vary a lot
    between pretraining runs, without adding anything a probe could learn. Note BatchNorm updates
    running statistics on every training-mode forward, unrolled hypergradient steps included.
    """

    def __init__(self, embed_dim: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6) if norm else nn.Identity()
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)   # MAE's probe init: small logits at start
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[N, D] -> logits [N, num_classes]."""
        return self.fc(self.norm(x))


class MLPHead(nn.Module):
    """``depth`` hidden layers (Linear, GELU, optional dropout), then a linear classifier."""

    def __init__(self, embed_dim: int, num_classes: int, hidden_dim: int = 256, depth: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """[N, D] -> logits [N, num_classes]."""
        return self.net(x)
