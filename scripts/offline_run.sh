#!/usr/bin/env bash
# Run the book at the gpu profile on a node with PyTorch and a GPU but no internet.
#
#     scripts/offline_run.sh KIT DATA OUT [run_chapters.py options, e.g. --chapters 00 01]
#
# KIT   a folder made by scripts/offline_kit.sh (wheels/ and inception-*.pth)
# DATA  a folder holding train.zip (and optionally test.zip), zips of a class-folder copy of
#       CIFAR-10 that unpack to train/<class>/<image> and test/<class>/<image>; or a folder
#       that already holds train/<class>/<image>; or, with the OSD_WORK_DIR of an earlier call
#       (which keeps the caches: teacher, classifier, FID statistics), any folder without
#       zips, to run more chapters on the data unpacked then
# OUT   where the executed notebooks, results records, figures and a summary go
#
# The wheels that are not installed already go into a temporary folder on PYTHONPATH; the
# node's own packages are left alone. Name the data for the records with OSD_DATASET_LABEL
# (e.g. "CIFAR-10 (JPEG copy)"); give OSD_GIT_COMMIT when the checkout has no .git.
set -euo pipefail
KIT=${1:?usage: scripts/offline_run.sh KIT DATA OUT [options]}
DATA=${2:?usage: scripts/offline_run.sh KIT DATA OUT [options]}
OUT=${3:?usage: scripts/offline_run.sh KIT DATA OUT [options]}
shift 3
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${OSD_WORK_DIR:-$(mktemp -d -t osd-offline-XXXXXX)}
[ -d "$KIT/wheels" ] || { echo "no $KIT/wheels: make the kit with scripts/offline_kit.sh" >&2; exit 2; }
# absolute paths: the chapters' kernels run in the checkout, not where this was called
KIT=$(CDPATH= cd -- "$KIT" && pwd)
mkdir -p "$WORK" && WORK=$(CDPATH= cd -- "$WORK" && pwd)
weights=$(ls "$KIT"/inception-*.pth 2>/dev/null | head -1 || true)
[ -n "$weights" ] || { echo "no Inception weights in $KIT: make the kit with scripts/offline_kit.sh" >&2; exit 2; }

# 1. the missing wheels, into a temporary site folder
"$PY" "$HERE/scripts/install_kit.py" "$KIT/wheels" "$WORK/site"
export PYTHONPATH="$WORK/site:$HERE${PYTHONPATH:+:$PYTHONPATH}"

# 2. the data, unpacked and checked before anything runs
mkdir -p "$WORK/data/cifar10"
if [ -f "$DATA/train.zip" ]; then
  for split in train test; do
    [ -f "$DATA/$split.zip" ] || continue
    echo "+ unzip $DATA/$split.zip"
    rm -rf "$WORK/unzip" && mkdir -p "$WORK/unzip"
    "$PY" -m zipfile -e "$DATA/$split.zip" "$WORK/unzip"
    if [ ! -d "$WORK/unzip/$split" ] || [ -z "$(find "$WORK/unzip/$split" -mindepth 1 -maxdepth 1 -type d)" ]; then
      echo "wrong layout in $DATA/$split.zip: it must unpack to $split/<class>/<image>" \
           "(found: $(ls "$WORK/unzip" | head -5 | tr '\n' ' '))" >&2
      exit 2
    fi
    rm -rf "$WORK/data/cifar10/$split" && mv "$WORK/unzip/$split" "$WORK/data/cifar10/$split"
  done
elif [ -d "$DATA/train" ]; then
  for split in train test; do
    [ -d "$DATA/$split" ] || continue
    src=$(cd "$DATA/$split" && pwd -P)
    [ "$src" = "$(cd "$WORK/data/cifar10" && pwd -P)/$split" ] && continue  # already there
    ln -sfn "$src" "$WORK/data/cifar10/$split"
  done
elif [ -d "$WORK/data/cifar10/train" ]; then
  # a second call with the same OSD_WORK_DIR: the data of the first call are still unpacked
  echo "+ using the data unpacked before in $WORK/data/cifar10 ($DATA holds no zips)"
else
  echo "no $DATA/train.zip and no $DATA/train/: give the folder that holds the CIFAR-10 zips" >&2
  exit 2
fi

# 3. the chapters, in order, each within its budget
export OSD_DATA_DIR="$WORK/data" OSD_INCEPTION_WEIGHTS="$weights"
export OSD_CACHE_DIR="${OSD_CACHE_DIR:-$WORK/cache}"
mkdir -p "$OSD_CACHE_DIR" "$OUT"
OSD_CACHE_DIR=$(CDPATH= cd -- "$OSD_CACHE_DIR" && pwd)
OUT=$(CDPATH= cd -- "$OUT" && pwd)
exec "$PY" "$HERE/scripts/run_chapters.py" --profile gpu --out "$OUT" "$@"
