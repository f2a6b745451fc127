"""The MLO-MAE graph at Fashion-MNIST size, built three ways for the benchmarks that share it:

- ``PlainStep``: one random-mask MAE pretraining step in a hand-written PyTorch loop: the unit
  every cost on this graph is counted in (DESIGN.md: cycle time / pretraining steps per cycle).
- ``build_mlomae``: the three levels through mlomae's engine, with the project's problems
  (``problems.pretrain.Reconstruction``, ``problems.finetune.Classification``,
  ``problems.mask.MaskLearning``) and the official wiring: steps 2 / 1 / 1, masker = MLP over the
  MAE's own patch embeddings (not detached), loss weighted by the mask probabilities, head on the
  class token, AdamW (β = 0.9, 0.95) everywhere.
- ``BettyGraph``: the same three levels as the official MLO-MAE code writes them for Betty 0.2.1
  (u2l {mask: [pretrain]}, l2u {pretrain: [finetune, mask], finetune: [mask]}, DARTS,
  retain_graph=True, unroll steps 2/1/1), over the same modules, data and optimizers.

Data are fixed random tensors of Fashion-MNIST's shape held in memory (a handful of batches per
level, cycled), so no loader and no download enters any timing.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from common import Cycle
from mlomae.engine import Dependency, Engine
from mlomae.models.attention import set_fused_attention
from mlomae.models.heads import LinearHead
from mlomae.models.mae import MaskedAutoencoder
from mlomae.models.maskers import PatchMLPMasker
from mlomae.models.masking import prob_topk_masking, random_masking



@dataclass(frozen=True)
class Sizes:
    img: int = 28
    patch: int = 4
    embed: int = 128
    depth: int = 4
    heads: int = 4
    dec_embed: int = 64
    dec_depth: int = 2
    masker_hidden: int = 256
    classes: int = 10
    batch: int = 128
    ratio: float = 0.75
    pool: str = "cls"                 # official: the class token
    head_norm: bool = False           # experiments/mlomae_published.yaml: BatchNorm (no affine) first
    detach_masker_input: bool = False  # official: the masker's gradient reaches the embeddings
    pretrain_steps: int = 2
    finetune_steps: int = 1
    n_batches: int = 3                 # distinct batches per level, cycled

    @property
    def patches(self) -> int:
        return (self.img // self.patch) ** 2


def mae(s: Sizes) -> MaskedAutoencoder:
    return MaskedAutoencoder(s.img, s.patch, 1, s.embed, s.depth, s.heads, s.dec_embed,
                             s.dec_depth, s.heads)


def initial_state(s: Sizes, seed: int = 0) -> dict[str, dict]:
    torch.manual_seed(seed)
    return {"mae": mae(s).state_dict(),
            "masker": PatchMLPMasker(s.patches, s.embed, s.masker_hidden).state_dict(),
            "head": LinearHead(s.embed, s.classes, norm=s.head_norm).state_dict()}


def modules(s: Sizes, state: dict[str, dict]):
    """Fresh MAE, masker and head holding ``state`` (in its dtype)."""
    dtype = next(t.dtype for t in state["mae"].values() if t.is_floating_point())
    m, k = mae(s), PatchMLPMasker(s.patches, s.embed, s.masker_hidden)
    h = LinearHead(s.embed, s.classes, norm=s.head_norm)
    for mod, key in ((m, "mae"), (k, "masker"), (h, "head")):
        mod.load_state_dict(copy.deepcopy(state[key]))
        mod.to(dtype)
    return m, k, h


def data(s: Sizes, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, list]:
    """Fixed batches per level: images [B, 1, 28, 28] (smooth random blobs) and labels."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for level in ("pretrain", "finetune", "mask"):
        batches = []
        for _ in range(s.n_batches):
            low = torch.rand(s.batch, 1, 7, 7, generator=g)
            x = F.interpolate(low, size=(s.img, s.img), mode="bilinear", align_corners=False)
            x = ((x - 0.5) / 0.3).to(dtype)
            y = torch.randint(0, s.classes, (s.batch,), generator=g)
            batches.append((x, y))
        out[level] = batches
    return out


def adamw(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.05) -> torch.optim.Optimizer:
    # Adam with decoupled decay is AdamW's update and the one Betty 0.2.1 can rebuild on torch 2.14
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay,
                            decoupled_weight_decay=True)


LR = {"pretrain": 1.5e-4, "finetune": 1e-3, "mask": 1e-3}


# -- the unit: one plain random-mask pretraining step ----------------------------------------

class PlainStep:
    """A hand-written MAE training step: random masks, loss, backward, AdamW."""

    def __init__(self, s: Sizes, state: dict, batches: list, fused: bool = True,
                 autocast: torch.dtype | None = None):
        self.model = modules(s, state)[0]
        set_fused_attention(self.model, fused)
        self.opt = adamw(self.model.parameters(), LR["pretrain"])
        self.s, self.it, self.autocast = s, iter(Cycle(batches)), autocast

    def __call__(self):
        imgs, _ = next(self.it)
        masking = random_masking(imgs.shape[0], self.s.patches, self.s.ratio)
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.model(imgs, masking)[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


# -- mlomae ------------------------------------------------------------------------------------

def build_mlomae(method: str, s: Sizes, state: dict, batches: dict, *, options: dict | None = None,
                 autocast: torch.dtype | None = None, fused: bool | None = None,
                 head_edge: dict | None = None) -> Engine:
    """``head_edge``: options of the mask -> finetune dependency alone (e.g. ``{"exact": True}``
    with darts: the push through the head by double backward instead of finite differences), and
    its own method under the key ``method`` (e.g. ``{"method": "unroll"}``: the fine-tune step is
    recorded and the push goes back through it; the encoder stays first order, so fused)."""
    from problems.finetune import Classification
    from problems.mask import MaskLearning
    from problems.pretrain import Reconstruction
    from mlomae.build import choose_attention
    m, k, h = modules(s, state)
    pre = Reconstruction("pretrain", m, optimizer=adamw(m.parameters(), LR["pretrain"]),
                         data=Cycle(batches["pretrain"]), steps=s.pretrain_steps, reads=["mask"],
                         masking="mlo", mask_ratio=s.ratio, masker="mask",
                         detach_masker_input=s.detach_masker_input)
    ft = Classification("finetune", h, optimizer=adamw(h.parameters(), LR["finetune"]),
                        data=Cycle(batches["finetune"]), steps=s.finetune_steps,
                        reads=["pretrain"], encoder="pretrain", pool=s.pool)
    mk = MaskLearning("mask", k, optimizer=adamw(k.parameters(), LR["mask"]),
                      data=Cycle(batches["mask"]), reads=["pretrain", "finetune"],
                      losses={"downstream": 1.0})
    head_edge = dict(head_edge or {})
    head_method = head_edge.pop("method", method)
    deps = [Dependency("mask", "pretrain"), Dependency("finetune", "pretrain"),
            Dependency("mask", "finetune", method=head_method,
                       options=head_edge if head_method != method else {**(options or {}), **head_edge})]
    eng = Engine([pre, ft, mk], deps, method=method, options=options or {},
                 autocast_dtype=autocast)
    if fused is None:   # the builder's choice: plain attention where a push differentiates twice
        choose_attention(None, eng)
    else:
        for module in (m, k):
            set_fused_attention(module, fused)
    return eng


def single_level(s: Sizes, state: dict, batches: list, fused: bool = True,
                 autocast: torch.dtype | None = None) -> Engine:
    """Plain random-mask pretraining through the engine (question 1)."""
    from problems.pretrain import Reconstruction
    m = modules(s, state)[0]
    pre = Reconstruction("pretrain", m, optimizer=adamw(m.parameters(), LR["pretrain"]),
                         data=Cycle(batches), masking="random", mask_ratio=s.ratio)
    set_fused_attention(m, fused)
    return Engine([pre], autocast_dtype=autocast)


# -- Betty ---------------------------------------------------------------------------------------

class BettyGraph:
    """The official MLO-MAE wiring on Betty 0.2.1; ``step()`` runs one cycle (2 engine steps)."""

    def __init__(self, s: Sizes, state: dict, batches: dict, alpha: float = 0.01):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine as BEngine
        from betty.problems import ImplicitProblem
        from betty.logging.logger_base import get_logger
        get_logger().setLevel(logging.WARNING)  # betty sets INFO on its first use
        m, k, h = modules(s, state)
        set_fused_attention(m, True)   # DARTS needs no second derivative

        def masking_of(imgs, mae_module, masker):
            x = mae_module.embed_patches(imgs)
            x = x.detach() if s.detach_masker_input else x
            return prob_topk_masking(torch.sigmoid(masker.logits(x)), s.ratio)

        class Pretraining(ImplicitProblem):
            def training_step(self, batch):
                imgs, _ = batch
                return self.module(imgs, masking_of(imgs, self.module, self.mask.module))[0]

        class Finetuning(ImplicitProblem):
            def training_step(self, batch):
                imgs, y = batch
                return F.cross_entropy(self.module(self.pretrain.module.features(imgs, s.pool)), y)

        class Masking(ImplicitProblem):
            def training_step(self, batch):
                imgs, y = batch
                feats = self.pretrain.module.features(imgs, s.pool)
                return F.cross_entropy(self.finetune.module(feats), y)

        def cfg(steps):
            return Config(type="darts", retain_graph=True, unroll_steps=steps, darts_alpha=alpha,
                          allow_unused=True)

        pre = Pretraining("pretrain", cfg(s.pretrain_steps), module=m,
                          optimizer=adamw(m.parameters(), LR["pretrain"]),
                          train_data_loader=Cycle(batches["pretrain"]))
        ft = Finetuning("finetune", cfg(s.finetune_steps), module=h,
                        optimizer=adamw(h.parameters(), LR["finetune"]),
                        train_data_loader=Cycle(batches["finetune"]))
        mk = Masking("mask", cfg(1), module=k, optimizer=adamw(k.parameters(), LR["mask"]),
                     train_data_loader=Cycle(batches["mask"]))
        self.problems = {"pretrain": pre, "finetune": ft, "mask": mk}
        self.engine = BEngine(config=EngineConfig(train_iters=10**9, logger_type="none"),
                              problems=[pre, ft, mk],
                              dependencies={"u2l": {mk: [pre]},
                                            "l2u": {pre: [ft, mk], ft: [mk]}})
        self.steps = s.pretrain_steps

    def step(self):
        for _ in range(self.steps):
            self.engine.global_step += 1
            self.engine.train_step()


def with_sizes(**kw: Any) -> Sizes:
    return replace(Sizes(), **kw)
