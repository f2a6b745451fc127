"""The synthetic ImageNet-shaped source: shapes, determinism from its seed, splits as
configured, option checks, and a whole run of the quickstart graph on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlomae.cli import main
from mlomae.data import build_dataset, eval_transform, load_data
from mlomae.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_have_imagenets_shape_and_cost_no_memory():
    train = build_dataset("synthetic_imagenet")
    test = build_dataset("synthetic_imagenet", split="test")
    assert (len(train), len(test)) == (1_281_167, 50_000)
    assert train.meta.num_classes == 1000 and train.meta.channels == 3
    assert train.meta.image_size == (224, 224)
    x, y = train.gather(torch.tensor([0, 5, 1_281_166]))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.uint8
    assert y.dtype == torch.long and ((y >= 0) & (y < 1000)).all()
    img, label = train[7]
    assert img.shape == (3, 224, 224) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and int(label) == int(train.labels[7])
    # balanced: every class 1281 or 1282 times
    counts = np.bincount(train.labels.numpy(), minlength=1000)
    assert counts.min() == 1281 and counts.max() == 1282


def test_items_depend_on_seed_split_and_index_only():
    a = build_dataset("synthetic_imagenet", n=50, n_test=20, image_size=32, num_classes=7, seed=3)
    b = build_dataset("synthetic_imagenet", n=50, n_test=20, image_size=32, num_classes=7, seed=3)
    other = build_dataset("synthetic_imagenet", n=50, n_test=20, image_size=32, num_classes=7, seed=4)
    test = build_dataset("synthetic_imagenet", split="test", n=50, n_test=20, image_size=32,
                         num_classes=7, seed=3)
    xa, ya = a.gather(torch.arange(20))
    xb, yb = b.gather(torch.arange(20))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the same item whatever batch it is drawn in (so ranks and resumed loaders agree)
    x5, _ = a.gather(torch.tensor([5]))
    x_mixed, _ = a.gather(torch.tensor([11, 5, 2]))
    assert torch.equal(x5[0], xa[5]) and torch.equal(x_mixed[1], xa[5])
    assert not torch.equal(other.gather(torch.arange(20))[0], xa)
    assert not torch.equal(test.gather(torch.arange(20))[0], xa)
    # class prototypes are shared by train and test: same-class images are closer on average
    xt, yt = test.gather(torch.arange(20))
    d = torch.cdist(xa.flatten(1).float(), xt.flatten(1).float())
    same = ya[:, None] == yt[None, :]
    assert d[same].mean() < d[~same].mean()


def test_splits_count_as_configured_and_loaders_batch_it():
    opts = {"n": 200, "n_test": 50, "num_classes": 10, "image_size": 32}
    data = load_data("synthetic_imagenet", {"pretrain": "train", "finetune": "train[:80%]",
                                            "mask": "train[80%:]", "few": "train[:80%]@balanced:10%",
                                            "test": "test"}, seed=0, disjoint=("finetune", "mask"),
                     **opts)
    sizes = {r: len(i) for r, i in data.indices.items()}
    # 80% of 200 = 160; 10% of each class's ~16 items in finetune rounds to 2
    assert sizes["pretrain"] == 200 and sizes["finetune"] == 160 and sizes["mask"] == 40
    assert sizes["test"] == 50
    assert not set(data.indices["finetune"]) & set(data.indices["mask"])
    few_labels = data.datasets["train"].labels.numpy()[data.indices["few"]]
    per_class = np.bincount(few_labels, minlength=10)
    ft_counts = np.bincount(data.datasets["train"].labels.numpy()[data.indices["finetune"]],
                            minlength=10)
    assert per_class.tolist() == [max(1, int(np.floor(0.1 * c + 0.5))) for c in ft_counts]
    loader = data.loader("finetune", 16, seed=0, transform=eval_transform(data.meta, 24))
    x, y = next(loader)
    assert x.shape == (16, 3, 24, 24) and y.shape == (16,) and x.dtype == torch.float32
    assert len(loader) == 10  # 160 / 16
    # two ranks take the two halves of one global batch
    ranks = [data.loader("mask", 4, seed=1, rank=r, world_size=2) for r in range(2)]
    whole = data.loader("mask", 8, seed=1)
    torch.testing.assert_close(torch.cat([next(r)[0] for r in ranks]), next(whole)[0])


@pytest.mark.parametrize("option,value,message", [
    ("image_size", 0, "must be an integer at least 1"),
    ("channels", 2, "must be 1 (grayscale) or 3 (colour)"),
    ("channels", 4, "must be an integer between 1 and 3"),
    ("num_classes", "ten", "must be an integer at least 1"),
    ("n", True, "must be an integer at least 1"),
    ("noise", -0.1, "must be a number >= 0"),
])
def test_bad_options_name_the_key_and_value(option, value, message):
    with pytest.raises(ConfigError) as e:
        build_dataset("synthetic_imagenet", **{option: value})
    assert e.value.key == f"data.options.{option}" and message in str(e.value)
    assert repr(value) in str(e.value)


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigError, match="takes no option size.*n, n_test, num_classes"):
        build_dataset("synthetic_imagenet", size=10)


def test_options_must_be_a_mapping(capsys):
    argv = ["validate", str(ROOT / "experiments" / "quickstart.yaml"),
            "data.dataset=synthetic_imagenet", "+data.options=[1, 2]"]
    assert main(argv) == 2
    assert "key 'data.options': must be a mapping" in capsys.readouterr().err


def test_quickstart_graph_runs_on_it(tmp_path):
    """Every problem of MLO-MAE (pretraining, head, mask level) reads it, split as configured."""
    rd = tmp_path / "run"
    argv = ["run", str(ROOT / "experiments" / "quickstart.yaml"), "--run-dir", str(rd),
            "--no-tracking", "data.dataset=synthetic_imagenet",
            "+data.options={n: 100, n_test: 16, num_classes: 10, channels: 1, image_size: 28}",
            "data.batch_size=8", "problems.mask.batch_size=8", "trainer.steps=2",
            "trainer.precision=fp32", "evaluation=[{protocol: problem, problem: finetune, split: test}]"]
    assert main(argv) == 0
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["outer_steps"] == 2
    # quickstart: pretrain 4 steps per mask step, finetune 1, mask 1
    assert s["problem_steps"] == {"pretrain": 8, "finetune": 2, "mask": 2}
    roles = json.loads((rd / "splits.json").read_text())["roles"]
    assert {r: v["size"] for r, v in roles.items()} == {"pretrain": 100, "finetune": 80,
                                                        "mask": 20, "test": 16}
