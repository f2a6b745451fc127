"""Helpers (no tests here): a tiny float64 MLO-MAE graph built by hand from the problem classes,
shared by the problem tests: a 12x12 one-channel MAE (3x3 patches of 4 px, embed 16, depth 1),
a PatchMLPMasker, a linear head, a discriminator stand-in, and fixed batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import Const
from mlomae.engine import Dependency, Engine
from mlomae.models.attention import set_fused_attention
from mlomae.models.heads import LinearHead
from mlomae.models.mae import MaskedAutoencoder
from mlomae.models.maskers import PatchMLPMasker
from problems.discriminator import Discriminator
from problems.finetune import Classification
from problems.mask import MaskLearning
from problems.pretrain import Reconstruction

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread and lose a lot to it on a busy machine
    (4x on these tests here); the process's setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
IMG, PATCH, D, CLASSES, N = 12, 4, 16, 3, 6
L = (IMG // PATCH) ** 2


def tiny_mae(seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    mae = MaskedAutoencoder(IMG, PATCH, 1, D, 1, 2, 16, 1, 2).to(DT)
    set_fused_attention(mae, False)   # built by hand: plain attention, as a builder would choose
    return mae


def tiny_masker(seed: int = 1) -> PatchMLPMasker:
    torch.manual_seed(seed)
    return PatchMLPMasker(L, D, 8).to(DT)


def tiny_head(seed: int = 2) -> LinearHead:
    torch.manual_seed(seed)
    head = LinearHead(D, CLASSES).to(DT)
    nn.init.normal_(head.fc.weight, std=0.5)   # logits that move with the features
    return head


def batches(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randn(N, 1, IMG, IMG, generator=g, dtype=DT)          # noqa: E731
    lab = lambda: torch.randint(0, CLASSES, (N,), generator=g)                 # noqa: E731
    return (img(), lab()), (img(), lab()), (img(), lab())


class LinearScorer(nn.Module):
    """A discriminator stand-in: D(m) = w . m / L per sample (patch-grid masks [N, L] or grids)."""

    def __init__(self, w: torch.Tensor, grid=(IMG // PATCH, IMG // PATCH), trainable=True):
        super().__init__()
        self.grid_size = tuple(grid)
        self.w = nn.Parameter(w.clone().to(DT), requires_grad=trainable)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(m.shape[0], -1).to(DT) @ self.w / self.w.numel()


def mlo_graph(method: str = "unroll", *, K: int = 2, lr_pre: float = 0.05, lr_ft: float = 0.5,
              masking: str = "mlo", detach: bool = True, losses=None, disc: nn.Module | None = None,
              options=None, edge_methods: dict | None = None, fused: bool = False,
              freeze_embed: bool = False):
    """pretrain (K steps) / finetune (1) / mask, plain SGD everywhere; with ``disc`` also a
    discriminator problem (first_order edge). Returns (engine, modules)."""
    mae, masker, head = tiny_mae(), tiny_masker(), tiny_head()
    if freeze_embed:   # the masker's input then no longer depends on what pretraining trains
        mae.patch_embed.requires_grad_(False)
    pre_b, ft_b, mk_b = batches()
    pre = Reconstruction("pretrain", mae, optimizer=torch.optim.SGD(mae.parameters(), lr=lr_pre),
                         data=Const(pre_b), steps=K, reads=["mask"], masking=masking,
                         detach_masker_input=detach)
    ft = Classification("finetune", head, optimizer=torch.optim.SGD(head.parameters(), lr=lr_ft),
                        data=Const(ft_b), reads=["pretrain"])
    reads = ["pretrain", "finetune"] + (["disc"] if disc is not None else [])
    mk = MaskLearning("mask", masker, optimizer=torch.optim.SGD(masker.parameters(), lr=0.1),
                      data=Const(mk_b), reads=reads, losses=losses or {"downstream": 1.0})
    problems = [pre, ft, mk]
    edge_methods = edge_methods or {}
    deps = [Dependency("mask", "pretrain", *edge_methods.get("pretrain", (None, {}))),
            Dependency("finetune", "pretrain"),
            Dependency("mask", "finetune", *edge_methods.get("finetune", (None, {})))]
    if disc is not None:
        opt = torch.optim.SGD([p for p in disc.parameters() if p.requires_grad], lr=0.1) \
            if any(p.requires_grad for p in disc.parameters()) else None
        problems.append(Discriminator("disc", disc, optimizer=opt, data=Const(pre_b),
                                      reads=["mask"]))
        deps.append(Dependency("mask", "disc", "first_order"))
    eng = Engine(problems, deps, method=method, options=options or {})
    for m in (mae, masker):   # built by hand: the attention kernel is set here, not by a builder
        set_fused_attention(m, fused)
    return eng, {"mae": mae, "masker": masker, "head": head, "disc": disc}
