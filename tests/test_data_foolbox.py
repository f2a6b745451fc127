"""CIFAR, class-folder and ImageNet loading on real images: the 20 CIFAR-10, 20 CIFAR-100,
20 ImageNet and 20 Fashion-MNIST images that PyPI's foolbox 3.3.4 wheel carries in foolbox/data/.

Their file names hold the label (``cifar10_00_3.png`` is image 0, class 3); they are the first 20
test images of each data set. The tests write them into the layout each loader expects and check
the loaded pixels and labels against the files, and the readers against torchvision's.
"""

from __future__ import annotations

import importlib.metadata
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlomae.data import build_dataset, eval_transform, make_loader, pretrain_transform
from mlomae.data.folder import imagenet_synsets
from mlomae.errors import DataError

FOOLBOX = "foolbox==3.3.4"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def _installed_data() -> Path | None:
    try:
        dist = importlib.metadata.distribution("foolbox")
    except importlib.metadata.PackageNotFoundError:
        return None
    p = Path(dist.locate_file("foolbox/data"))
    return p if dist.version == "3.3.4" and p.is_dir() else None


@pytest.fixture(scope="session")
def foolbox_data(pytestconfig, tmp_path_factory) -> Path:
    """foolbox/data/ from the installed package (`pip install --no-deps foolbox==3.3.4`), else
    from the wheel, downloaded once into pytest's cache."""
    found = _installed_data()
    if found:
        return found
    cache = Path(pytestconfig.cache.mkdir("foolbox-3.3.4")) if getattr(pytestconfig, "cache", None) else \
        tmp_path_factory.mktemp("foolbox")
    data = cache / "foolbox" / "data"
    if len(list(data.glob("*"))) < 100:
        wheels = list(cache.glob("foolbox-3.3.4-*.whl"))
        if not wheels:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", FOOLBOX,
                                "-d", str(cache)], capture_output=True, text=True, timeout=300)
            wheels = list(cache.glob("foolbox-3.3.4-*.whl"))
            if not wheels:
                pytest.skip(f"cannot get the {FOOLBOX} wheel: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(cache, [n for n in z.namelist() if n.startswith("foolbox/data/")])
    return data


def files_of(data: Path, prefix: str) -> tuple[list[Path], np.ndarray]:
    """The 20 files of one data set in order (``cifar10_*`` must not match ``cifar100_*``)."""
    files = sorted(data.glob(f"{prefix}_[0-9][0-9]_*"))
    return files, np.array([int(f.stem.split("_")[-1]) for f in files])


def images_of(data: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    files, labels = files_of(data, prefix)
    return np.stack([np.asarray(Image.open(f)) for f in files]), labels


def test_the_wheel_holds_twenty_of_each(foolbox_data):
    for prefix in ("cifar10", "cifar100", "imagenet", "fashionMNIST"):
        assert len(files_of(foolbox_data, prefix)[0]) == 20


def test_fashion_mnist_debian_test_set_starts_with_the_foolbox_images(foolbox_data):
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed: run `make data`")
    x, y = images_of(foolbox_data, "fashionMNIST")
    test = build_dataset("fashion_mnist", root=foolbox_data / "none", split="test")
    assert np.array_equal(test.images[:20, 0].numpy(), x)
    assert np.array_equal(test.labels[:20].numpy(), y)


def write_cifar(root: Path, x: np.ndarray, y: np.ndarray, hundred: bool) -> None:
    """CIFAR's python pickles, as torchvision's CIFAR10/CIFAR100 download them."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # [N, 3072], channel planes, row-major
    if hundred:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for name in ("train", "test"):
            batch = {"data": data, "fine_labels": y.tolist(), "coarse_labels": [0] * len(y)}
            (d / name).write_bytes(pickle.dumps(batch))
        (d / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
        return
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(5):  # 4 images in each of the 5 training batches
        part = slice(4 * i, 4 * i + 4)
        batch = {"data": data[part], "labels": y[part].tolist()}
        (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    (d / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": y.tolist()}))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_NAMES}))


@pytest.mark.parametrize("name,prefix", [("cifar10", "cifar10"), ("cifar100", "cifar100")])
def test_cifar_pickles_read_as_torchvision_reads_them(foolbox_data, tmp_path, monkeypatch,
                                                      name, prefix):
    import torchvision
    x, y = images_of(foolbox_data, prefix)
    if name == "cifar10":
        # CIFAR-10's test set begins cat, ship, ship, airplane, frog, frog, automobile, frog, ...
        assert y[:8].tolist() == [3, 8, 8, 0, 6, 6, 1, 6]
    write_cifar(tmp_path, x, y, hundred=name == "cifar100")
    for split in ("train", "test"):
        ds = build_dataset(name, root=tmp_path, split=split)
        assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), x)
        assert np.array_equal(ds.labels.numpy(), y)
        assert ds.meta.num_classes == (100 if name == "cifar100" else 10)
    # torchvision's reader (its md5 check knows only the real files) on the same pickles
    tv = getattr(torchvision.datasets, name.upper())
    monkeypatch.setattr(tv, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    ref = tv(str(tmp_path), train=True)
    ours = build_dataset(name, root=tmp_path, split="train")
    assert np.array_equal(ours.images.permute(0, 2, 3, 1).numpy(), ref.data)
    assert ours.labels.tolist() == list(ref.targets)
    if name == "cifar10":
        assert ours.meta.classes == tuple(CIFAR10_NAMES)


def test_cifar_missing_batch_names_the_files(foolbox_data, tmp_path):
    x, y = images_of(foolbox_data, "cifar10")
    write_cifar(tmp_path, x, y, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as e:
        build_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)


def test_image_folder_uses_train_classes_for_every_split(foolbox_data, tmp_path):
    import torchvision
    files, y = files_of(foolbox_data, "cifar10")
    for i, (f, label) in enumerate(zip(files, y)):
        for split in ("train",) + (("val",) if i < 10 else ()):
            d = tmp_path / split / CIFAR10_NAMES[label]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / f.name)
    present = sorted(set(y.tolist()))  # 8 of the 10 classes occur among the 20 images
    assert len(present) == 8
    train = build_dataset("image_folder", root=tmp_path, split="train")
    val = build_dataset("image_folder", root=tmp_path, split="test")
    assert len(train) == 20 and len(val) == 10 and train.meta.num_classes == 8
    # labels = rank of the class name among the folders, as torchvision's ImageFolder numbers them
    ref = torchvision.datasets.ImageFolder(str(tmp_path / "train"))
    assert train.labels.tolist() == [s[1] for s in ref.samples]
    # val (the first 10 images, fewer classes) is numbered by the train folders, class by class
    assert val.labels.tolist() == sorted(present.index(c) for c in y[:10])
    assert train.meta.image_size == (32, 32)  # the images' own size
    x, label = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(torch.round(x * 255).byte(), train.get_uint8(0)[0])


def test_imagenet_layout_standard_labels_and_transforms(foolbox_data, tmp_path):
    synsets = imagenet_synsets()
    assert synsets is not None and synsets[0] == "n01440764"  # class 0 of ImageNet-1K: tench
    files, y = files_of(foolbox_data, "imagenet")
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for f, label in zip(files, y):
            d = root / split / synsets[label]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / f.name)
    train = build_dataset("imagenet", root=tmp_path, split="train")
    val = build_dataset("imagenet", root=tmp_path, split="test")
    order = np.argsort([synsets[label] for label in y], kind="stable")
    # 19 classes present (609 twice), still labelled with their ImageNet-1K numbers
    assert sorted(train.labels.tolist()) == sorted(y.tolist())
    assert train.labels.tolist() == y[order].tolist() == val.labels.tolist()
    assert train.meta.num_classes == 1000 and train.meta.image_size == (256, 256)
    assert train.get_uint8(0)[0].shape == (3, 256, 256)
    ev = make_loader(val, None, 8, shuffle=False, drop_last=False,
                     transform=eval_transform(val.meta, 224))
    sizes = [x.shape for x, _ in ev.iter_epoch()]
    assert sizes == [(8, 3, 224, 224)] * 2 + [(4, 3, 224, 224)]
    aug = pretrain_transform(train.meta, 224)
    with_workers = make_loader(train, None, 10, seed=0, transform=aug, num_workers=2)
    in_process = make_loader(train, None, 10, seed=0, transform=aug)
    for _ in range(2):
        (a, ya), (b, yb) = next(with_workers), next(in_process)
        assert a.shape == (10, 3, 224, 224) and torch.equal(a, b) and torch.equal(ya, yb)


def test_imagenet_rejects_other_layouts(foolbox_data, tmp_path):
    files = sorted(foolbox_data.glob("imagenet_0*"))[:2]
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "train" / "n01440764" / f.name)
        shutil.copy(f, tmp_path / "val" / f.name)  # val not sorted into class folders
    with pytest.raises(DataError, match="one folder per class"):
        build_dataset("imagenet", root=tmp_path, split="test")
    (tmp_path / "train" / "dogs").mkdir()
    shutil.copy(files[0], tmp_path / "train" / "dogs" / files[0].name)
    with pytest.raises(DataError, match="'dogs' is not an ImageNet-1K WordNet id"):
        build_dataset("imagenet", root=tmp_path, split="train")
    with pytest.raises(DataError) as e:
        build_dataset("imagenet", root=tmp_path / "nowhere", split="train")
    assert str(tmp_path / "nowhere" / "train") in str(e.value)
    assert str(tmp_path / "nowhere" / "imagenet" / "train") in str(e.value)
