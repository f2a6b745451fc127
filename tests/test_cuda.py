"""What only a GPU can show: device placement, CUDA -> CPU checkpoints, attention switching on
CUDA's fused kernels, the non-finite guard on CUDA. Marked ``cuda``; skipped, saying so, where
torch sees no CUDA device. ``make gpu-check`` (benchmarks/gpu_check.py) runs them first.

The device is chosen by config (``trainer.device=cuda``) as a user would. To check the tests
themselves on a machine without a GPU, ``MLOMAE_CUDA_TEST_DEVICE=cpu`` runs the same code with
``trainer.device=cpu`` (the assertions then hold trivially for placement and the CUDA -> CPU
load, and the attention test expects the CPU's own rules).

Data are generated (``synthetic_imagenet``), so nothing has to be on the GPU machine's disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mlomae import checkpoint, config
from mlomae.build import build, choose_attention
from mlomae.errors import NonFiniteError
from mlomae.models.attention import set_fused_attention
from mlomae.models.masking import random_masking

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("MLOMAE_CUDA_TEST_DEVICE", "cuda")
NO_CUDA = DEVICE.startswith("cuda") and not torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(NO_CUDA, reason="no CUDA device (torch.cuda.is_available() is False); "
                                       "these tests run on a GPU machine: make gpu-check"),
]

QUICKSTART = (str(ROOT / "experiments" / "quickstart.yaml"), [
    "data.dataset=synthetic_imagenet",
    "+data.options={n: 128, n_test: 32, num_classes: 10, channels: 1, image_size: 28}",
    "data.batch_size=8", "problems.mask.batch_size=8"])
# imagenet.yaml's MLO-MAE graph (PatchMLPMasker over the MAE's embeddings, class-token head,
# 1000 classes) with a tiny ViT at 32 px
TINY_IMAGENET = (str(ROOT / "experiments" / "imagenet.yaml"), [
    "data.dataset=synthetic_imagenet", "+data.options={n: 200, n_test: 16, image_size: 32}",
    "data.img_size=32", "data.batch_size=4", "data.num_workers=0",
    "models.mae.img_size=32", "models.mae.patch_size=8", "models.mae.embed_dim=64",
    "models.mae.depth=2", "models.mae.num_heads=4", "models.mae.decoder_embed_dim=32",
    "models.mae.decoder_depth=1", "models.mae.decoder_num_heads=4",
    "models.masker.num_patches=16", "models.masker.embed_dim=64", "models.masker.hidden_dim=32",
    "models.head.embed_dim=64"])
GRAPHS = {"quickstart": QUICKSTART, "mlomae_imagenet_tiny": TINY_IMAGENET}


def load(graph: str, *extra: str, device: str = DEVICE) -> config.Config:
    path, overrides = GRAPHS[graph]
    return config.load(path, [*overrides, f"trainer.device={device}", "trainer.precision=fp32",
                              "tracking.enabled=false", "evaluation=[]", *extra])


def tensors(obj):
    """Every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_problems_batches_and_checkpoints_live_on_the_configured_device(graph, tmp_path):
    from mlomae.run import run
    cfg = load(graph, "trainer.steps=2", "trainer.checkpoint_every=1")
    summary, rd = run(cfg, run_dir=tmp_path / "run", tracking=False)
    assert summary["status"] == "FINISHED" and summary["device"].startswith(DEVICE.split(":")[0])
    built = build(load(graph, "trainer.steps=2"))
    assert built.device.type == torch.device(DEVICE).type
    for name, p in built.problems.items():
        assert all(on_device(t) for t in p.module.parameters()), name
        assert all(on_device(t) for t in p.module.buffers()), name
        batch = p.next_batch()
        assert all(on_device(t) for t in tensors(batch)), f"{name}'s batch"
    built.engine.step()
    for name, p in built.problems.items():   # optimizer state made on the device too
        state = p.optimizer.state_dict()["state"]
        assert state and all(on_device(t) for s in state.values() for k, t in s.items()
                             if k != "step"), name
    # the checkpoint keeps the device it was written from; checkpoint.load maps it to the CPU
    path = rd / "checkpoints" / "step_00000002.pt"
    raw = torch.load(path, weights_only=True)
    params = [t for p in raw["engine"]["problems"].values() for t in tensors(p["module"])]
    assert params and all(on_device(t) for t in params)
    loaded = checkpoint.load(path)
    assert all(t.device.type == "cpu" for t in tensors(loaded["engine"]))


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_a_cuda_checkpoint_loads_and_trains_on_the_cpu(graph, tmp_path):
    gpu = build(load(graph, "trainer.steps=3"))
    gpu.engine.step()
    path = checkpoint.save(tmp_path, 1, {"engine": gpu.engine.state_dict()})
    state = checkpoint.load(path)["engine"]
    cpu = build(load(graph, "trainer.steps=3", device="cpu"))
    cpu.engine.load_state_dict(state)
    for name in gpu.problems:
        for (k, a), (_, b) in zip(gpu.problems[name].module.state_dict().items(),
                                  cpu.problems[name].module.state_dict().items()):
            assert b.device.type == "cpu"
            torch.testing.assert_close(b, a.cpu(), rtol=0, atol=0, msg=f"{name}.{k}")
        assert cpu.problems[name].step_count == gpu.problems[name].step_count
    cpu.engine.step()   # optimizer state moved to the CPU with the parameters
    assert cpu.engine.outer_step == 2


def fused_flags(module) -> set[bool]:
    return {m.fused_attn for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool)}


@pytest.mark.parametrize("method,twice", [("cg", True), ("unroll", True), ("darts", False),
                                          ("first_order", False)])
def test_second_order_methods_switch_the_mae_to_plain_attention(method, twice):
    built = build(load("mlomae_imagenet_tiny", "trainer.steps=2", f"hypergrad.method={method}"))
    chosen = choose_attention(built.cfg, built.engine)
    assert chosen["pretrain"] is (not twice)
    assert fused_flags(built.problems["pretrain"].module) == {not twice}
    recs = built.engine.step()   # double backward through the MAE runs (plain attention) here
    mask = [r for r in recs if r.problem == "mask"][-1]
    if method != "first_order":   # first_order pushes nothing through the lower problems
        assert mask.hypergrad_norm is not None and bool(torch.isfinite(mask.hypergrad_norm))
        assert float(mask.hypergrad_norm) > 0


def test_fused_attention_on_cuda_gives_the_plain_attention_gradient():
    """The fused kernel the MAE keeps under first-order methods computes what the plain one
    does (first derivatives), so switching only changes speed."""
    built = build(load("mlomae_imagenet_tiny", "trainer.steps=1"))
    mae = built.problems["pretrain"].module
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    grads = {}
    for fused in (True, False):
        set_fused_attention(mae, fused)
        torch.manual_seed(0)
        masking = random_masking(4, 16, 0.75, device=DEVICE)
        loss = mae(x, masking)[0]
        grads[fused] = torch.autograd.grad(loss, list(mae.parameters()), allow_unused=True)
    for a, b in zip(grads[True], grads[False]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_nan_on_cuda_stops_or_is_skipped_and_counted():
    toy = str(ROOT / "experiments" / "toy_bilevel.yaml")
    common = [f"trainer.device={DEVICE}", "tracking.enabled=false", "trainer.steps=2"]
    built = build(config.load(toy, common))
    reg = built.problems["regression"].module
    assert reg.weight.device.type == torch.device(DEVICE).type
    with torch.no_grad():
        reg.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite loss in problem 'regression' at its step 1"):
        built.engine.step()

    built = build(config.load(toy, [*common, "trainer.on_nonfinite=skip"]))
    reg = built.problems["regression"].module
    with torch.no_grad():
        reg.weight[0, 0] = float("inf")
    before = reg.weight.detach().clone()
    built.engine.step()
    assert built.problems["regression"].skipped == 5   # every one of its 5 steps
    torch.testing.assert_close(reg.weight.detach(), before, equal_nan=True)
