#!/usr/bin/env bash
# Make an offline kit for a GPU node that has Python, PyTorch and torchvision but no package
# index: the wheels the book needs beyond torch/torchvision/numpy/scipy/matplotlib/pillow/tqdm
# (papermill and its Jupyter kernel chain, diffusers, torch-fidelity), and the FID Inception
# weights converted for torch-fidelity. Run it where PyPI is reachable, from a checkout set up
# with `make setup`:
#
#     scripts/offline_kit.sh KIT [PYTHON_VERSION] [PLATFORM]      # defaults: 3.12 x86_64
#
# then copy KIT, the checkout and a class-folder zip of the data to the node and run
# scripts/offline_run.sh there. FID_DTYPE=fp32 writes the 87 MB fp32 weights instead of the
# 44 MB fp16 file (made for transfers capped at 64 MiB); the wheels are about 32 MB, less
# with SKIP naming packages the node has.
set -euo pipefail
KIT=${1:?usage: scripts/offline_kit.sh KIT [PYTHON_VERSION] [PLATFORM]}
PYVER=${2:-3.12}
ARCH=${3:-x86_64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PY" ] || { echo "no $PY: run 'make setup' first (or set PYTHON=...)" >&2; exit 2; }
mkdir -p "$KIT/wheels"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_${ARCH}")
done
common=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}"
        --dest "$KIT/wheels")
echo "+ pip download papermill ipykernel psutil diffusers (with their dependencies) for Python $PYVER"
"$PY" -m pip download -q "${common[@]}" papermill ipykernel psutil diffusers
echo "+ pip download torch-fidelity (its dependencies are torch, torchvision, numpy, ...)"
"$PY" -m pip download -q "${common[@]}" --no-deps torch-fidelity
# what the node brings: drop those wheels (offline_run.sh also skips any installed package);
# SKIP="requests pyyaml ..." drops more, for a node whose package list is known (smaller kit)
for name in numpy pillow tqdm torch torchvision scipy matplotlib ${SKIP:-}; do
  rm -f "$KIT/wheels/${name//-/_}"-[0-9]*.whl "$KIT/wheels/${name}"-[0-9]*.whl
done
dtype=${FID_DTYPE:-fp16}
flag=$([ "$dtype" = fp16 ] && echo --fp16 || true)
echo "+ python -m osdlib.metrics --prepare-weights $flag --out $KIT/inception-$dtype.pth"
"$PY" -m osdlib.metrics --prepare-weights $flag --out "$KIT/inception-$dtype.pth"
echo "kit in $KIT: $(ls "$KIT/wheels" | wc -l) wheels, $(du -sh "$KIT/wheels" | cut -f1); weights $(du -sh "$KIT/inception-$dtype.pth" | cut -f1)"
