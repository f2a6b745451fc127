"""Images in class folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), read lazily.

Each image is decoded with PIL, its shorter side resized to ``load_size`` and the centre square cut,
so that every item has the same shape and a batch can be stacked and then augmented as a whole
(``transforms.py``). For ImageNet (load_size 256) the evaluation transform's centre crop of 224 is
then exactly the usual resize-256/crop-224; the pretraining random-resized crop is drawn from the
256 centre square rather than the full photo, which loses a sliver of the long side.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mlomae.data.base import DatasetMeta, to_float_image
from mlomae.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (the classes, as torchvision's ImageFolder)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def loose_images(split_dir: Path) -> list[str]:
    """Image files lying directly in ``split_dir`` (a sign of an unsorted ImageNet val folder)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_file() and is_image_file(e.name))


class FolderImageDataset(Dataset):
    """Images under ``split_dir/<class>/`` (any depth), labelled by ``class_to_idx``.

    ``class_to_idx`` comes from the train folder for every split, so that a val folder missing a
    class still gets the train split's label numbers.
    """

    def __init__(self, split_dir: str | os.PathLike, class_to_idx: dict[str, int],
                 load_size: int | None, meta: DatasetMeta):
        self.split_dir = Path(split_dir)
        self.class_to_idx = dict(class_to_idx)
        samples: list[tuple[str, int]] = []
        for cls in class_folders(self.split_dir):
            if cls not in self.class_to_idx:
                raise DataError(f"{self.split_dir}/{cls}: class folder not present in the train "
                                f"split, so it has no label; remove it or add it to train/")
            for dirpath, dirnames, filenames in os.walk(self.split_dir / cls, followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if is_image_file(f):
                        samples.append((os.path.join(dirpath, f), self.class_to_idx[cls]))
        if not samples:
            raise DataError(f"{self.split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in any "
                            f"class folder")
        self.samples = samples
        self.labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        if load_size is None:
            # Keep the images' own size: taken from the first image (its shorter side).
            with Image.open(samples[0][0]) as im:
                load_size = min(im.size)
        self.load_size = int(load_size)
        self.meta = meta.with_(image_size=(self.load_size, self.load_size))

    def __len__(self) -> int:
        return len(self.samples)

    def get_uint8(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` as uint8 ``[3, S, S]``: shorter side resized to S, centre square kept."""
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e})") from e
        img = resize_center_square(img, self.load_size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x.contiguous(), self.labels[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_uint8(i)
        return to_float_image(x), y


def resize_center_square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    if (w, h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def imagenet_synsets() -> list[str] | None:
    """The 1000 ImageNet-1K WordNet ids in their standard (sorted) label order.

    Read from timm's bundled list without importing timm (which is slow to import); None if
    timm is not installed.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "_info" / "imagenet_synsets.txt"
        if p.is_file():
            ids = p.read_text().split()
            if len(ids) == 1000:
                return ids
    return None
