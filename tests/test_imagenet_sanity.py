"""experiments/imagenet.yaml end to end on the CPU, on a tiny ImageNet-layout folder written
here (train/<wnid>/*.png, val/<wnid>/*.png): the standard dataset code, the 256 -> 224 pipeline,
the 98% / 2% split of train and ViT-B/16's patch grid (196 patches) as configured.

``validate`` builds the experiment at its own ViT-B size (MAE 111.7M, masker 77.2M parameters).
The run uses a small ViT at the same 224 px and patch 16: at ViT-B size two outer steps at
batch 2 took 122 s of CPU time on 2 cores (and 7 minutes of wall time on a loaded machine),
mostly the MLO-MAE cycle's passes through ViT-B and writing a 2.3 GB checkpoint, far above a
test's budget; the small model keeps every code path (schedule, darts through the head and the
MAE, the evaluation, the checkpoint) and the counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlomae.cli import main
from mlomae.data.folder import imagenet_synsets

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = str(ROOT / "experiments" / "imagenet.yaml")
PER_CLASS = {"train": 50, "val": 2}   # 100 train images: the 2% mask split holds 2 = one batch
SMALL_VIT = ["models.mae.embed_dim=64", "models.mae.depth=2", "models.mae.num_heads=4",
             "models.mae.decoder_embed_dim=32", "models.mae.decoder_depth=1",
             "models.mae.decoder_num_heads=4", "models.masker.embed_dim=64",
             "models.masker.hidden_dim=32", "models.head.embed_dim=64"]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    from PIL import Image
    synsets = imagenet_synsets()
    if synsets is None:
        pytest.skip("timm's list of ImageNet ids is needed to label wnid folders")
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, k in PER_CLASS.items():
        for c, wnid in enumerate(synsets[:2]):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(k):   # tiny, not square; JPEG for one class, PNG for the other
                img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
                img.save(d / f"{wnid}_{i}.{'JPEG' if c == 0 else 'png'}")
    return root


@pytest.mark.slow
def test_validate_at_vit_b_size(imagenet_folder, capsys):
    argv = ["validate", IMAGENET, f"data.root={imagenet_folder}", "trainer.device=cpu",
            "data.batch_size=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "schedule: pretrain pretrain finetune mask" in out
    assert "mae (111.66M params), masker (77.17M params), head (0.77M params)" in out
    # 98% of 100 train images for the head, 2% for the mask level, val is the test split
    assert "splits: pretrain=100, finetune=98, mask=2, test=4" in out


@pytest.mark.slow
def test_two_outer_steps_at_batch_2(imagenet_folder, tmp_path):
    rd = tmp_path / "run"
    argv = ["run", IMAGENET, "--run-dir", str(rd), "--no-tracking",
            f"data.root={imagenet_folder}", "trainer.device=cpu", "trainer.steps=2",
            "data.batch_size=2", "data.num_workers=0",
            "evaluation=[{protocol: problem, problem: finetune, split: test}]", *SMALL_VIT]
    assert main(argv) == 0
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["device"] == "cpu"
    assert s["outer_steps"] == 2 and s["target_steps"] == 2
    # configs/graphs/mlomae.yaml: steps 2 / 1 / 1, so one outer step is
    # pretrain pretrain finetune mask, and two outer steps are 4 + 2 + 2 problem steps
    assert s["schedule"] == ["pretrain", "pretrain", "finetune", "mask"]
    assert s["problem_steps"] == {"pretrain": 4, "finetune": 2, "mask": 2}
    assert s["skipped_steps"] == {"pretrain": 0, "finetune": 0, "mask": 0}
    assert s["eval"]["test_count"] == 4
    assert [p.name for p in (rd / "checkpoints").glob("*.pt")] == ["step_00000002.pt"]
    roles = json.loads((rd / "splits.json").read_text())["roles"]
    assert {r: v["size"] for r, v in roles.items()} == {"pretrain": 100, "finetune": 98,
                                                        "mask": 2, "test": 4}
