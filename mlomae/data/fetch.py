"""Make sure a dataset is on this machine: ``python -m mlomae.data.fetch [NAME ...] [--root DIR]``.

For each name (default: fashion_mnist) it first looks where ``build_dataset`` looks; if both base
splits load, it says where they are and stops (so it is quick to run again). Otherwise it calls
torchvision's downloader into the data root (``--root``, else $MLOMAE_DATA, else
~/.cache/mlomae). ``--check`` only looks. Exit code 0 when every dataset is there, 1 otherwise.
``scripts/get_data.sh`` (``make data``) tries Debian's package for Fashion-MNIST before this.
"""

from __future__ import annotations

import argparse
import sys
import time

from mlomae.data.base import data_roots
from mlomae.data.sources import DATASETS, build_dataset
from mlomae.errors import MlomaeError

DOWNLOADABLE = ("fashion_mnist", "mnist", "cifar10", "cifar100")


def fetch(name: str, root: str | None = None, check_only: bool = False) -> bool:
    t0 = time.perf_counter()
    try:
        sizes = [len(build_dataset(name, root, split)) for split in ("train", "test")]
        print(f"{name}: present ({sizes[0]} train / {sizes[1]} test images, "
              f"checked in {time.perf_counter() - t0:.1f} s)")
        return True
    except MlomaeError as e:
        if check_only or name not in DOWNLOADABLE:
            print(f"{name}: {e}", file=sys.stderr)
            return False
    target = data_roots(root)[0]
    print(f"{name}: not found; downloading into {target} ...", flush=True)
    try:
        sizes = [len(build_dataset(name, root, split, download=True)) for split in ("train", "test")]
    except MlomaeError as e:
        hint = ("install Debian's dataset-fashion-mnist (as root: apt-get install "
                "dataset-fashion-mnist), or " if name == "fashion_mnist" else "")
        print(f"{name}: {e}\nNo internet here? {hint}copy the files into {target}.",
              file=sys.stderr)
        return False
    print(f"{name}: downloaded ({sizes[0]} train / {sizes[1]} test images) into {target}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlomae.data.fetch", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=["fashion_mnist"],
                   help=f"datasets to get (downloadable: {', '.join(DOWNLOADABLE)})")
    p.add_argument("--root", default=None, help="data root (default: $MLOMAE_DATA or ~/.cache/mlomae)")
    p.add_argument("--check", action="store_true", help="only look, do not download")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(sorted(DATASETS))}")
    ok = [fetch(n, args.root, args.check) for n in args.names]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
