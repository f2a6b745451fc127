#!/usr/bin/env bash
# Get the data sets the experiments read (default: Fashion-MNIST); `make data` runs this.
#
#   scripts/get_data.sh [NAME ...]     names: fashion_mnist (default), mnist, cifar10, cifar100
#
# Fashion-MNIST: Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) when
# apt-get can be used (as root), else torchvision's download into the data root
# ($MLOMAE_DATA, else ~/.cache/mlomae). Other names: torchvision's download. Quick and silent
# apart from one line per data set when the data is already there.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
ROOT_ARGS=()
if [ -n "${MLOMAE_DATA:-}" ]; then ROOT_ARGS=(--root "$MLOMAE_DATA"); fi

DEBIAN_DIR=/usr/share/datasets/fashion-mnist
debian_has_fashion() {
  local f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$DEBIAN_DIR/$f.gz" ] || return 1
  done
}

apt_install_fashion() {
  command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] || return 1
  echo "fashion_mnist: installing Debian's dataset-fashion-mnist ..."
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine has no package lists: update only when the install cannot find the package.
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
}

status=0
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(fashion_mnist)
for name in "${names[@]}"; do
  if [ "$name" = fashion_mnist ]; then
    if debian_has_fashion; then
      echo "fashion_mnist: present in $DEBIAN_DIR"
      continue
    fi
    if apt_install_fashion && debian_has_fashion; then
      echo "fashion_mnist: installed into $DEBIAN_DIR"
      continue
    fi
    echo "fashion_mnist: Debian package not usable here (needs apt-get as root); trying a download"
  fi
  if ! "$PY" -m mlomae.data.fetch "$name" "${ROOT_ARGS[@]}"; then
    echo "get_data.sh: could not get $name. Set MLOMAE_DATA (or data.root) to a directory that" \
         "holds it, or install Debian's dataset-fashion-mnist as root." >&2
    status=1
  fi
done
exit $status
