"""Fashion-MNIST from Debian's dataset-fashion-mnist files (installed by `make data`).

Expected numbers come from the dataset's own description (github.com/zalandoresearch/fashion-mnist,
README and Xiao et al. 2017): 60,000 training and 10,000 test images of 28x28 grayscale pixels in
10 classes, 6,000 training and 1,000 test images per class. Reader checks compare with torchvision's
own idx reader on the same bytes.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlomae.data import build_dataset, make_loader, resolve_splits
from mlomae.data import sources
from mlomae.errors import DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed: run `make data`")


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    # An empty root so that nothing but the Debian files can be found.
    root = tmp_path_factory.mktemp("empty_root")
    train = build_dataset("fashion_mnist", root=root, split="train")
    return train, build_dataset("fashion_mnist", root=root, split="test"), root


def test_sizes_shapes_and_class_counts_match_the_dataset_description(fmnist):
    train, test, _ = fmnist
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.long
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.meta.num_classes == 10 and train.meta.channels == 1
    assert train.meta.image_size == (28, 28)
    assert train.meta.classes[0] == "T-shirt/top" and train.meta.classes[9] == "Ankle boot"
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long


def test_loading_is_one_array_read_not_per_image(fmnist, monkeypatch):
    # 60k images through PIL one by one take tens of seconds; one idx read per file takes well
    # under 1 s (0.4 s measured). Counted, not timed: two reads (images, labels), no image opened
    # one by one, and the images are one uint8 tensor over one buffer.
    import PIL.Image
    reads, opened = [], []
    real_read = sources.read_idx
    monkeypatch.setattr(sources, "read_idx", lambda path: reads.append(Path(path).name) or
                        real_read(path))
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a))
    train = build_dataset("fashion_mnist", root=fmnist[2], split="train")
    assert reads == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] and opened == []
    assert train.images.is_contiguous() and train.images.dtype == torch.uint8


def test_meta_normalisation_is_the_train_set_statistics(fmnist):
    train, _, _ = fmnist
    x = train.images.double() / 255
    # The stored (0.2860, 0.3530) are these numbers to 4 decimals.
    assert x.mean().item() == pytest.approx(train.meta.mean[0], abs=5e-5)
    assert x.std().item() == pytest.approx(train.meta.std[0], abs=5e-5)


def test_torchvision_layout_under_root_reads_the_same_as_torchvision(fmnist, tmp_path):
    # torchvision keeps uncompressed idx files in ROOT/FashionMNIST/raw; its reader is the reference.
    import torchvision
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # torchvision wants all four present
        with gzip.open(DEBIAN / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ours = build_dataset("fashion_mnist", root=tmp_path, split="test")
    ref = torchvision.datasets.FashionMNIST(str(tmp_path), train=False)
    assert torch.equal(ours.images[:, 0], ref.data)
    assert torch.equal(ours.labels, ref.targets)
    assert torch.equal(ours.images, fmnist[1].images)


def test_missing_data_names_every_place_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DIR", tmp_path / "no_debian")
    monkeypatch.setenv("MLOMAE_DATA", str(tmp_path / "env_root"))
    with pytest.raises(DataError) as e:
        build_dataset("fashion_mnist", root=tmp_path / "given_root")
    msg = str(e.value)
    for place in (tmp_path / "given_root" / "FashionMNIST" / "raw", tmp_path / "given_root" /
                  "fashion-mnist", tmp_path / "env_root" / "FashionMNIST" / "raw",
                  tmp_path / "no_debian" / "fashion-mnist"):
        assert str(place) in msg
    assert "make data" in msg and "data.root" in msg and "MLOMAE_DATA" in msg


def test_truncated_idx_file_is_reported(tmp_path):
    raw = tmp_path / "fashion-mnist"
    raw.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        data = gzip.open(DEBIAN / f"{stem}.gz").read()
        (raw / stem).write_bytes(data[:-100] if "images" in stem else data)
    with pytest.raises(DataError, match="truncated"):
        build_dataset("fashion_mnist", root=tmp_path, split="test")


def test_balanced_label_fractions_on_the_real_labels(fmnist):
    train, test, _ = fmnist
    idx = resolve_splits({"finetune": "train@balanced:10%", "few": "train@balanced:1%",
                          "test": "test"}, {"train": train, "test": test}, seed=0)
    # 10% and 1% of 6000 images per class.
    assert train.labels[idx["finetune"]].bincount().tolist() == [600] * 10
    assert train.labels[idx["few"]].bincount().tolist() == [60] * 10
    assert idx["test"].size == 10000


def test_one_epoch_of_the_80_percent_split(fmnist):
    train, _, _ = fmnist
    idx = resolve_splits({"finetune": "train[:80%]", "mask": "train[80%:]"}, {"train": train}, 0)
    assert idx["finetune"].size == 48000 and idx["mask"].size == 12000
    loader = make_loader(train, idx["finetune"], 256, shuffle=True, seed=0, drop_last=True)
    seen = np.concatenate([loader.batch_indices(0, s) for s in range(len(loader))])
    assert len(loader) == 187  # floor(48000 / 256)
    assert seen.size == 187 * 256 and np.unique(seen).size == seen.size
    assert np.isin(seen, idx["finetune"]).all()
    x, y = next(loader)
    assert x.shape == (256, 1, 28, 28) and y.shape == (256,)


def test_fetch_reports_present_data_and_fails_clearly_on_absent(capsys, tmp_path, monkeypatch):
    from mlomae.data import fetch
    assert fetch.main(["fashion_mnist", "--check", "--root", str(tmp_path)]) == 0
    assert "fashion_mnist: present (60000 train / 10000 test images" in capsys.readouterr().out
    monkeypatch.setenv("MLOMAE_DATA", str(tmp_path))
    assert fetch.main(["cifar10", "--check", "--root", str(tmp_path)]) == 1
    assert str(tmp_path / "cifar-10-batches-py") in capsys.readouterr().err


def test_get_data_script_is_quick_when_the_data_is_there():
    import subprocess
    script = Path(__file__).resolve().parents[1] / "scripts" / "get_data.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # The one line of the branch that finds the files and installs nothing.
    assert r.stdout.strip() == f"fashion_mnist: present in {DEBIAN}" and r.stderr == ""


def test_download_path_asks_torchvision_for_the_first_root(tmp_path, monkeypatch):
    # No internet in tests: a stand-in for torchvision's FashionMNIST writes what its download
    # would (the .gz files under ROOT/FashionMNIST/raw), copied from the Debian package.
    import torchvision
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in DEBIAN.glob("t10k-*.gz"):
                shutil.copy(f, raw / f.name)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    monkeypatch.setattr(sources, "DEBIAN_DIR", tmp_path / "no_debian")
    with pytest.raises(DataError):
        build_dataset("fashion_mnist", root=tmp_path / "r", split="test")  # download=False
    assert calls == []
    ds = build_dataset("fashion_mnist", root=tmp_path / "r", split="test", download=True)
    assert calls == [(str(tmp_path / "r"), False, True)] and len(ds) == 10000
