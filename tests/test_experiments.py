"""Every file in experiments/: it validates (on this machine's data, or on synthetic images with a
tiny model where its data is not here), runs a few steps with a tiny model, and the quickstart
runs end to end and writes the test accuracy that its head really has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlomae import config
from mlomae.cli import main
from mlomae.data.sources import DEBIAN_DIR
from mlomae.run import Runner
from test_problems_tiny import one_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.yaml"))
NOT_HERE = {"cifar10.yaml", "cifar100.yaml", "imagenet.yaml"}   # no CIFAR / ImageNet installs
MAE_EXPERIMENTS = [e for e in EXPERIMENTS if e != "toy_bilevel.yaml"]
HAVE_FASHION = (DEBIAN_DIR / "fashion-mnist").is_dir()

TINY_IMG, TINY_PATCH, TINY_D = 8, 4, 16


def tiny_overrides(name: str) -> list[str]:
    """Overrides that shrink every model of an MLO-MAE experiment to embed 16 / depth 1 on 8x8
    synthetic images (2x2 patches of 4 px), consistently across MAE, masker, head and the
    discriminator, and shrink data and evaluation to match."""
    cfg = config.load(ROOT / "experiments" / name)
    ch = cfg["models"]["mae"].get("in_chans", 3)
    classes = next(s["num_classes"] for s in cfg["models"].values() if "num_classes" in s)
    g, L = TINY_IMG // TINY_PATCH, (TINY_IMG // TINY_PATCH) ** 2
    sizes = {
        "MaskedAutoencoder": dict(img_size=TINY_IMG, patch_size=TINY_PATCH, embed_dim=TINY_D,
                                  depth=1, num_heads=2, decoder_embed_dim=TINY_D,
                                  decoder_depth=1, decoder_num_heads=2),
        "PatchMLPMasker": dict(num_patches=L, embed_dim=TINY_D, hidden_dim=8),
        "SharedPatchMasker": dict(embed_dim=TINY_D, hidden_dim=8),
        "LinearHead": dict(embed_dim=TINY_D),
        "MaskDiscriminator": dict(grid_size=[g, g], channels=[4, 4]),
        "AttentionMaskGenerator": dict(img_size=TINY_IMG, patch_size=TINY_PATCH, embed_dim=TINY_D,
                                       depth=1, num_heads=2, conv_channels=[4]),
    }
    out = []
    for model, spec in cfg["models"].items():
        for k, v in sizes.get(spec["target"].rsplit(".", 1)[-1], {}).items():
            out.append(f"+models.{model}.{k}={json.dumps(v)}")
    opts = {"n": 160, "image_size": TINY_IMG, "channels": ch, "num_classes": classes}
    out += ["data.dataset=synthetic_classification", f"+data.options={json.dumps(opts)}",
            "data.batch_size=8", f"+data.img_size={TINY_IMG}", "+data.num_workers=0",
            "data.splits.finetune=train[:50%]", "data.splits.mask=train[50%:]",
            "trainer.device=cpu", "trainer.log_every=1", "trainer.checkpoint_every=0",
            "evaluation=[{protocol: problem, problem: finetune, split: test}]"]
    return out


@pytest.fixture
def no_data_here(monkeypatch, tmp_path):
    """Every default data root points at an empty directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLOMAE_DATA", str(tmp_path / "data"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_validates(name, capsys, no_data_here):
    path = str(ROOT / "experiments" / name)
    if name not in NOT_HERE:
        if "fashion" in (ROOT / "experiments" / name).read_text() and not HAVE_FASHION:
            pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
        assert main(["validate", path]) == 0, capsys.readouterr().err
        return
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "not found. Looked in:" in err and "MLOMAE_DATA" in err
    assert main(["validate", path, *tiny_overrides(name)]) == 0, capsys.readouterr().err


def test_imagenet_run_stops_at_once_saying_where_it_looked(tmp_path, capsys, no_data_here,
                                                         monkeypatch):
    """``mlomae run experiments/imagenet.yaml`` without ImageNet: exit 2 before building ViT-B
    (no model is built), naming every folder it looked in and the setting that points at the
    data; no run directory is left behind."""
    from mlomae import build
    built = []
    monkeypatch.setattr(build, "build_models", lambda *a, **k: built.append(a) or {})
    run_dir = tmp_path / "run"
    code = main(["run", str(ROOT / "experiments" / "imagenet.yaml"), "--no-tracking",
                 "--run-dir", str(run_dir)])
    assert code == 2 and built == []
    err = capsys.readouterr().err
    for looked in (tmp_path / "data" / "train", tmp_path / "data" / "imagenet" / "train",
                   tmp_path / "home" / ".cache" / "mlomae" / "train"):
        assert str(looked) in err
    assert "set data.root (or the environment variable MLOMAE_DATA)" in err
    assert not run_dir.exists()
    # pointed elsewhere on the command line, it looks there first
    assert main(["validate", str(ROOT / "experiments" / "imagenet.yaml"),
                 f"data.root={tmp_path / 'elsewhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.index(str(tmp_path / "elsewhere" / "train")) < err.index(str(tmp_path / "data"))


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST is not installed")
def test_quickstart_runs_end_to_end_and_writes_the_test_accuracy(tmp_path):
    """Fashion-MNIST itself, the quickstart's own model, 3 outer steps on small splits: the run
    writes summary.json with the head's test accuracy, and that number is the accuracy the
    trained head has on the test split when counted again; the linear probe reports too."""
    overrides = ["trainer.steps=3", "data.batch_size=32", "data.splits.finetune=train[:640]",
                 "data.splits.mask=train[640:960]", "data.splits.test=test[:500]",
                 "evaluation=[{protocol: problem, problem: finetune, split: test}, "
                 "{protocol: problem, problem: finetune, split: mask}, "
                 "{protocol: linear, max_iter: 50}]"]
    cfg = config.load(ROOT / "experiments" / "quickstart.yaml", overrides)
    runner = Runner(cfg, run_dir=tmp_path / "run", tracking=False)
    summary = runner.run()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["status"] == "FINISHED"
    assert written["problem_steps"] == {"pretrain": 12, "finetune": 3, "mask": 3}   # 4/1/1
    acc = written["eval"]["test_top1"]
    assert written["eval"]["test_count"] == 500
    data = runner.built.data
    again = runner.built.problems["finetune"].evaluate(
        data.loader("test", 100, shuffle=False, drop_last=False).iter_epoch())
    assert acc == again["test_top1"] == summary["eval"]["test_top1"]
    # the same head on the validation role: its own names, its own 320 images
    on_mask = runner.built.problems["finetune"].evaluate(
        data.loader("mask", 100, shuffle=False, drop_last=False).iter_epoch())
    assert written["eval"]["mask_count"] == 320
    assert written["eval"]["mask_top1"] == on_mask["test_top1"]
    # per-batch float32 sums in another batching: equal to summation order
    assert written["eval"]["mask_loss"] == pytest.approx(on_mask["test_loss"], rel=1e-6)
    assert 0.0 <= written["eval"]["linear_top1"] <= 100.0


def counts(schedule: list[str], outer: int) -> dict[str, int]:
    return {n: schedule.count(n) * outer for n in dict.fromkeys(schedule)}


@pytest.mark.parametrize("name", [e for e in MAE_EXPERIMENTS if e != "ablation_hypergrad.yaml"])
def test_each_mae_experiment_runs_a_few_steps_tiny(name, tmp_path):
    cfg = config.load(ROOT / "experiments" / name, tiny_overrides(name) + ["trainer.steps=2"])
    runner = Runner(cfg, run_dir=tmp_path / "run", tracking=False)
    summary = runner.run()
    assert summary["status"] == "FINISHED"
    assert summary["problem_steps"] == counts(summary["schedule"], 2)
    assert 0.0 <= summary["eval"]["test_top1"] <= 100.0
    for name_, p in runner.built.problems.items():
        for t in p.params():
            assert torch.isfinite(t).all(), name_


@pytest.mark.parametrize("method", ["darts", "unroll", "neumann", "cg", "sama", "first_order"])
def test_ablation_runs_under_each_method(method, tmp_path):
    """The sweep's grid points, tiny: each method takes two outer steps; the second-order ones
    run with the MAE's fused attention off, the others keep it."""
    cfg = config.load(ROOT / "experiments" / "ablation_hypergrad.yaml",
                      tiny_overrides("ablation_hypergrad.yaml")
                      + ["trainer.steps=2", f"hypergrad.method={method}",
                         "trainer.precision=fp32"])   # under bf16 a CPU unfuses everywhere
    runner = Runner(cfg, run_dir=tmp_path / "run", tracking=False)
    summary = runner.run()
    assert summary["status"] == "FINISHED"
    fused = {a.fused_attn for a in runner.built.models["mae"].modules() if hasattr(a, "fused_attn")}
    assert fused == {method in ("darts", "sama", "first_order")}


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """`lr=1e-5` (an override or a YAML value) is the number 1e-5, as YAML 1.2 reads it; PyYAML's
    YAML 1.1 would give the string "1e-5" and the schema would refuse it."""
    toy = Path(__file__).resolve().parent.parent / "experiments" / "toy_bilevel.yaml"
    cfg = config.load(toy, ["problems.hyper.optimizer.lr=1e-5"])
    assert cfg["problems"]["hyper"]["optimizer"]["lr"] == 1e-5
    f = tmp_path / "exp.yaml"
    f.write_text(toy.read_text().replace("lr: 0.05}", "lr: 5e-2}"))
    assert config.load(f)["problems"]["regression"]["optimizer"]["lr"] == 0.05
    assert config.load_yaml("a: '1e-5'\nb: 2026-11-23x") == {"a": "1e-5", "b": "2026-11-23x"}
