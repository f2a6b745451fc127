"""Evaluation on a tiny real run: end-of-run evaluations, ``mlomae eval`` / ``masks`` / ``export``
on its directory, summary.json and MLflow, and the errors a user can hit."""

from __future__ import annotations

import json
import shutil
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mlomae import cli
from mlomae.build import build
from mlomae.config import load
from mlomae.data import resolve_splits
from mlomae.errors import MlomaeError
from mlomae.eval.export import load_timm
from mlomae.eval.features import role_items
from mlomae.eval.pictures import curves_px, grid_px, heatmap_px, masks_and_reconstructions
from mlomae.eval.rundir import load_run
from mlomae.eval.spec import Labels
from mlomae.run import Runner

PROBLEMS = '''
import torch
from mlomae.engine import Problem
from mlomae.models.masking import random_masking, score_masking


class TinyReconstruction(Problem):
    """MAE reconstruction with uniform random masks."""

    def loss(self, batch):
        x, _ = batch
        m = random_masking(x.shape[0], self.module.num_patches, 0.75, device=x.device)
        return self.module(x, m)[0]


class FixedMaskReconstruction(TinyReconstruction):
    """Draws the same mask for every image: patches 0, 1, 2 of 4 (the highest fixed scores)."""

    def masking_for(self, imgs):
        scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(imgs.shape[0], -1)
        return score_masking(scores, 0.75)
'''

EXPERIMENT = '''
name: tiny-eval
seed: 0
data:
  dataset: synthetic_classification
  options: {{n: 200, num_classes: 4, image_size: 8}}
  batch_size: 32
  splits: {{pretrain: train, finetune: "train[:80%]", test: test}}
models:
  mae: {{target: mlomae.models.mae.MaskedAutoencoder, img_size: 8, patch_size: 4, in_chans: 1,
        embed_dim: 16, depth: 2, num_heads: 2, decoder_embed_dim: 8, decoder_depth: 1,
        decoder_num_heads: 2}}
problems:
  pretrain: {{target: "{target}", module: mae, data: pretrain,
             optimizer: {{name: adamw, lr: 1.0e-3}}}}
trainer: {{steps: 3, log_every: 1, checkpoint_every: {ckpt}}}
tracking: {{uri: "{uri}", experiment: tiny-eval}}
evaluation:
  - {{protocol: linear}}
  - {{protocol: linear, labels: 10%}}
  - {{protocol: linear, model: pixels}}
  - {{protocol: knn, k: 5}}
  - {{protocol: finetune, epochs: 1, batch_size: 40}}
'''


def write_experiment(d: Path, uri: str, cls: str = "TinyReconstruction", ckpt: int = 3,
                     target: str | None = None) -> Path:
    (d / "tiny_problems.py").write_text(PROBLEMS)
    exp = d / "tiny.yaml"
    target = target or f"{d / 'tiny_problems.py'}:{cls}"
    exp.write_text(textwrap.dedent(EXPERIMENT.format(target=target, uri=uri, ckpt=ckpt)))
    return exp


@pytest.fixture(scope="module")
def run(tmp_path_factory, mlflow_uri):
    """One tiny run, tracked into the session's sqlite MLflow: (run_dir, summary)."""
    d = tmp_path_factory.mktemp("eval_run")
    cfg = load(write_experiment(d, mlflow_uri))
    runner = Runner(cfg, run_dir=d / "run")
    summary = runner.run()
    return d / "run", summary


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def mlflow_metrics(run_dir: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient
    state = json.loads((run_dir / "mlflow.json").read_text())
    return MlflowClient(state["uri"]).get_run(state["run_id"]).data.metrics


def test_end_of_run_evaluations_in_summary_and_mlflow(run):
    run_dir, summary = run
    ev = summary["eval"]
    assert set(ev) == {"linear_top1", "linear_top1_10pct", "linear_pixels_top1", "knn_top1",
                       "finetune_top1"}
    # synthetic classes are smooth prototypes plus noise: raw pixels separate them on the test split
    assert ev["linear_pixels_top1"] == 100.0
    assert all(0.0 <= v <= 100.0 for v in ev.values())
    # top-1 in percent of the 200 test items: a whole count over 200, not a float32 mean
    assert all(abs(v * 2 - round(v * 2)) < 1e-9 for v in ev.values())
    logged = mlflow_metrics(run_dir)
    assert {f"eval/{k}" for k in ev} <= set(logged)


def test_label_fraction_is_the_balanced_split_spec(run):
    """``labels: 10%`` on role finetune = train[:80%] selects exactly train[:80%]@balanced:10%."""
    run_dir, _ = run
    _, built, _ = load_run(run_dir)
    got = role_items(built, "finetune", Labels(__import__("fractions").Fraction(1, 10), "10%"))
    want = resolve_splits({"x": "train[:80%]@balanced:10%"}, built.data.datasets, 0)["x"]
    np.testing.assert_array_equal(got, want)
    assert got.size == 16   # 160 items, 40 per class -> 4 per class


def test_cli_eval_merges_into_summary_and_mlflow(run, capsys):
    run_dir, _ = run
    before = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert cli.main(["eval", str(run_dir), "--protocol", "knn", "--labels", "10%", "k=3",
                     "vote=majority"]) == 0
    out = capsys.readouterr().out
    assert "knn_top1_10pct:" in out
    ev = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert ev == {**before, "knn_top1_10pct": ev["knn_top1_10pct"]}
    assert "eval/knn_top1_10pct" in mlflow_metrics(run_dir)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["eval/knn_top1_10pct"] \
        == ev["knn_top1_10pct"]


def test_finetune_leaves_the_run_model_alone(run):
    run_dir, _ = run
    _, built, _ = load_run(run_dir)
    before = {k: v.clone() for k, v in built.models["mae"].state_dict().items()}
    from mlomae.eval import run_protocol
    out = run_protocol(built, {"protocol": "finetune", "epochs": 1, "batch_size": 40}, run_dir, "eval")
    assert list(out) == ["finetune_top1"]
    for k, v in built.models["mae"].state_dict().items():
        assert torch.equal(v, before[k]), k


def test_masks_writes_pngs_of_the_set_size(run, capsys):
    run_dir, _ = run
    assert cli.main(["masks", str(run_dir), "--num", "3"]) == 0
    pics = run_dir / "pictures"
    assert png_size(pics / "masks.png") == grid_px(3) == (450, 450)
    assert png_size(pics / "mask_heatmap.png") == heatmap_px() == (450, 400)
    assert png_size(pics / "curves.png") == curves_px(1) == (400, 300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pictures"] == {"masks": "pictures/masks.png",
                                   "mask_heatmap": "pictures/mask_heatmap.png",
                                   "curves": "pictures/curves.png"}
    from mlflow.tracking import MlflowClient
    state = json.loads((run_dir / "mlflow.json").read_text())
    arts = [a.path for a in MlflowClient(state["uri"]).list_artifacts(state["run_id"], "pictures")]
    assert sorted(arts) == ["pictures/curves.png", "pictures/mask_heatmap.png", "pictures/masks.png"]
    assert "no problem of the run draws masks" in capsys.readouterr().err   # random fallback


def test_masks_come_from_the_problem_when_it_draws_them(tmp_path):
    cfg = load(write_experiment(tmp_path, "sqlite:///unused.db", cls="FixedMaskReconstruction"))
    built = build(cfg)
    imgs = torch.randn(5, 1, 8, 8)
    mask, recon = masks_and_reconstructions(built, imgs)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0]] * 5
    # the reconstruction is the MAE's decoder output for that very mask
    from mlomae.eval.pictures import mae_reconstruct
    mae = built.models["mae"].eval()
    want = mae_reconstruct(mae, imgs, built.problems["pretrain"].masking_for(imgs))
    torch.testing.assert_close(recon, want)


def test_masks_from_the_pretraining_problems_reconstruct(tmp_path):
    """problems.pretrain.Reconstruction returns predicted *patches* (``.pred``) and ``.masking``:
    the pictures show exactly its mask and its prediction turned back into images."""
    from mlomae.eval.pictures import patches_to_images
    pytest.importorskip("problems.pretrain")
    cfg = load(write_experiment(tmp_path, "sqlite:///unused.db",
                                target="problems.pretrain.Reconstruction"))
    built = build(cfg)
    imgs = torch.randn(5, 1, 8, 8)
    torch.manual_seed(7)
    mask, recon = masks_and_reconstructions(built, imgs)
    torch.manual_seed(7)
    with torch.no_grad():
        out = built.problems["pretrain"].reconstruct(imgs)
    assert torch.equal(mask, out.masking.mask) and mask.sum(1).tolist() == [3.0] * 5
    torch.testing.assert_close(recon, patches_to_images(built.models["mae"], imgs, out.pred))


def test_export_round_trip_matches_features(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "enc.safetensors"
    assert cli.main(["export", str(run_dir), "--format", "timm", "--out", str(out)]) == 0
    kwargs = json.loads(out.with_suffix(".json").read_text())["timm_kwargs"]
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(**kwargs).eval()
    missing, unexpected = vit.load_state_dict(load_file(str(out)), strict=False)
    assert (missing, unexpected) == ([], [])
    _, built, _ = load_run(run_dir)
    mae = built.models["mae"].eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vit(x), mae.features(x, "cls"), rtol=0, atol=1e-6)
        torch.testing.assert_close(load_timm(out)(x), mae.features(x, "cls"), rtol=0, atol=1e-6)
    # mean pooling exports as global_pool='avg' without fc_norm
    from mlomae.eval.export import export_timm
    export_timm(mae, tmp_path / "mean.safetensors", pool="mean")
    with torch.no_grad():
        torch.testing.assert_close(load_timm(tmp_path / "mean.safetensors")(x),
                                   mae.features(x, "mean"), rtol=0, atol=1e-6)


def test_user_errors_exit_2_with_a_message(run, tmp_path, capsys):
    run_dir, _ = run
    cases = [
        (["eval", str(tmp_path / "nope")], "run directory not found"),
        (["eval", str(run_dir), "--labels", "7"], "key 'eval.labels'"),
        (["eval", str(run_dir), "--model", "masker"], "names no declared model"),
        (["eval", str(run_dir), "--protocol", "finetune", "--model", "pixels"], "not 'pixels'"),
        (["eval", str(run_dir), "k=3"], "not an option of protocol 'linear'"),
        (["export", str(run_dir), "--out", str(tmp_path / "x.st"), "--model", "nope"], "--model"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    # a run directory without checkpoints (trainer.checkpoint_every: 0)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    assert cli.main(["masks", str(bare)]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err
    with pytest.raises(MlomaeError):
        load_run(bare)


def test_result_name_of_an_evaluation_the_run_list_does_not_hold():
    """A study that adds an evaluation after a run finished calls it with key evaluation[5] and
    its own name, while the run's list holds another spec (raw pixels) at index 5: the result
    keeps its own name (finetune_top1_10pct), so it cannot overwrite the pixels' number. The
    run's own specs keep their unique names (a second identical spec is suffixed _1)."""
    from mlomae.eval import _name
    listed = [{"protocol": "linear"}, {"protocol": "linear"},
              {"protocol": "finetune", "labels": "100%"}, {"protocol": "knn"}, {"protocol": "knn"},
              {"protocol": "linear", "model": "pixels"}]
    cfg = type("Cfg", (dict,), {"file": "run/config.yaml"})(evaluation=listed)
    built = type("Built", (), {"cfg": cfg, "models": {}})()
    added = {"protocol": "finetune", "labels": "10%", "epochs": 5, "name": "finetune_top1_10pct"}
    assert _name(built, added, "evaluation[5]") == "finetune_top1_10pct"
    assert _name(built, {"protocol": "linear", "model": "pixels"}, "evaluation[5]") == "linear_pixels_top1"
    assert _name(built, {"protocol": "linear"}, "evaluation[1]") == "linear_top1_1"
    assert _name(built, {"protocol": "knn", "name": "knn_top1_4"}, "evaluation[4]") == "knn_top1_4"
