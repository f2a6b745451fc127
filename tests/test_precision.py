"""Precision: ``trainer.precision: auto`` by the hardware, and every hypergradient method under
bf16 autocast within cosine 0.999 of float32.

Measured on a small weighted-MLP bilevel problem (below): without evaluating the lower loss in
float32 for the push, finite-difference darts reached cosine 0.9956 and cg 0.875 under bf16;
with it (``Method.precise_loss``) every method is at 0.99997 or above. SAMA's preconditioner is
sensitive to the Adam state the bf16 lower steps leave (cosine 0.997 over a whole outer step),
so it is compared at a fixed state: the same lower steps, the push under either precision.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import Const
from mlomae.build import resolve_precision
from mlomae.engine import Dependency, Engine, Problem

N, D, H, C = 64, 16, 64, 5


def task():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(D, C, generator=g)
    X, Xv = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    return (X, (X @ teacher).argmax(1)), (Xv, (Xv @ teacher).argmax(1)), net, 0.5 * torch.randn(N, generator=g)


class Logits(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.value = nn.Parameter(v.clone())

    def forward(self):
        return self.value


class Inner(Problem):
    def loss(self, b):
        w = torch.sigmoid(self.read("w")())
        return (w * F.cross_entropy(self.module(b[0]), b[1], reduction="none")).mean()


class Outer(Problem):
    def loss(self, b):
        return F.cross_entropy(self.read("inner")(b[0]), b[1])


def engine(method, options, adam=False):
    train, val, net, s0 = task()
    w = Logits(s0)
    o = torch.optim.Adam(net.parameters(), lr=1e-2) if adam else torch.optim.SGD(net.parameters(), lr=0.1)
    inner = Inner("inner", net, optimizer=o, data=Const(train), steps=3, reads=["w"])
    outer = Outer("w", w, optimizer=torch.optim.SGD(w.parameters(), lr=0.1), data=Const(val), reads=["inner"])
    return Engine([inner, outer], [Dependency("w", "inner")], method=method, options=options)


def cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("method,options", [("unroll", {}), ("darts", {}), ("darts", {"exact": True}),
                                            ("neumann", {}), ("cg", {}), ("sama", {})])
def test_every_method_under_bf16_agrees_with_float32(method, options):
    """The lower's 3 SGD steps and the push, from the same state, under each precision."""
    grads = []
    for dtype in (None, torch.bfloat16):
        eng = engine(method, options)
        eng.autocast_dtype = dtype
        eng.prefix("w")
        grads.append(eng.gradient("w")[2][0])
    assert grads[0].norm() > 0 and cosine(*grads) >= 0.999


def test_sama_under_bf16_at_a_fixed_adam_state():
    grads = []
    for dtype in (None, torch.bfloat16):
        eng = engine("sama", {}, adam=True)
        eng.prefix("w")              # the same Adam steps in float32
        eng.autocast_dtype = dtype   # the push (and the upper loss) under the precision
        grads.append(eng.gradient("w")[2][0])
    assert grads[0].norm() > 0 and cosine(*grads) >= 0.999


def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == ("fp32", "trainer.precision")
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        chosen, why = resolve_precision("auto", cpu)
        assert chosen == expected and why.startswith("auto: ")
        assert ("natively" in why) == (expected == "bf16")


def test_bf16_on_the_cpu_takes_plain_attention_under_auto():
    """The CPU's fused attention is the slow kernel under bf16 (see build.choose_attention)."""
    from mlomae.build import choose_attention
    from test_problems_tiny import mlo_graph
    eng, mods = mlo_graph("darts", K=1)
    assert choose_attention(None, eng)["pretrain"] is True
    eng.autocast_dtype = torch.bfloat16
    assert choose_attention(None, eng) == {"pretrain": False, "finetune": False, "mask": False}
    assert {a.fused_attn for a in mods["mae"].modules() if hasattr(a, "fused_attn")} == {False}
