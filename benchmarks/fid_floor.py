"""The FID floor of real CIFAR-10: the test images against the training images.

    python benchmarks/fid_floor.py --data DIR --out results/benchmarks/fid-floor-<device>.json

``DIR`` holds CIFAR-10 as class folders, ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``
(a JPEG copy, say). No generator comes closer to the training set than images of the same
distribution that it never saw, so this FID is the floor under every FID of the book's
CIFAR-10 models, at the same numbers of images. Measured with the book's FID protocol
(:func:`osdlib.metrics.inception_features`: torch-fidelity's Inception, converted weights):

* the test images against a fixed random subset of the training images (``--train-size``;
  0 takes all 50,000, the usual protocol's 50k vs 10k), and at half the test set;
* half the test set against the other half: the same distribution, so what is left is what
  a finite number of images adds (FID is biased upwards, more so for fewer images);
* with ``--reencode N``, N test images against themselves after one more JPEG pass at the
  copy's own quality (read from its quantisation tables): how much a JPEG pass moves the
  statistics, a lower bound on what the first pass did to the originals.

Each set's features are kept under ``$OSD_CACHE_DIR/fid/features``, so a stopped run starts
again where it was. Inception-v3 at 299x299 runs at about 7 images/s on two CPU cores, 10k
images a set: about 25 minutes per set there, seconds on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osdlib import data, metrics, results  # noqa: E402

# the IJG (libjpeg) luminance quantisation table at quality 50, in natural (row) order
_IJG_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55]


def jpeg_settings(folder: Path) -> dict:
    """The quality and chroma subsampling a folder's JPEG files were written with, estimated
    from the first file's luminance quantisation table (libjpeg's scaling of its standard
    table: scale = 200 - 2q above quality 50, 5000 / q below); ``{}`` if it holds no JPEG."""
    from PIL import Image, JpegImagePlugin

    first = next(
        (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")), None
    )
    if first is None:
        return {}
    with Image.open(first) as im:
        table = list(im.quantization[0])[:16]  # PIL gives the tables in natural order
        sampling = JpegImagePlugin.get_sampling(im)
    scale = float(np.median([100 * t / s for t, s in zip(table, _IJG_LUMA)]))
    quality = round((200 - scale) / 2) if scale <= 100 else round(5000 / scale)
    names = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
    return {"quality": int(min(max(quality, 1), 100)), "subsampling": names.get(sampling, "other")}


def reencode(images: torch.Tensor, quality: int, subsampling: str) -> torch.Tensor:
    """uint8 images (N, 3, H, W) after one JPEG pass at ``quality`` (PIL/libjpeg), decoded."""
    from PIL import Image

    out = torch.empty_like(images)
    for i, x in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(
            buf, "JPEG", quality=quality, subsampling=subsampling
        )
        with Image.open(buf) as im:
            out[i] = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return out


def features(name: str, images: torch.Tensor, source: str, args) -> torch.Tensor:
    """Inception features of a set, from the cache when this set was done before."""
    weights = metrics.find_inception_weights(args.weights) or metrics.prepare_inception_weights()
    tag = hashlib.sha1(f"{source}|{len(images)}|{weights.name}".encode()).hexdigest()[:10]
    path = metrics.fid_cache_dir() / "features" / f"{name}-{len(images)}-{tag}.pt"
    if path.is_file():
        print(f"{name}: {len(images):,} images, features from {path}")
        return torch.load(path)
    t0 = time.perf_counter()
    f = metrics.inception_features(
        images, weights, device=args.device, batch_size=args.batch, progress=True
    )
    dt = time.perf_counter() - t0
    print(f"{name}: {len(images):,} images in {dt:.0f} s ({len(images) / dt:.1f} images/s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(f, tmp)
    tmp.replace(path)  # a stopped run leaves no half-written file
    args.rates.append(len(images) / dt)
    return f


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and test/ class folders")
    parser.add_argument("--train-size", type=int, default=10000, help="0: all training images")
    parser.add_argument("--reencode", type=int, default=5000, help="test images to re-encode")
    parser.add_argument(
        "--label",
        default="CIFAR-10",
        help='the data\'s name in the record ("CIFAR-10 (JPEG copy)")',
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--weights", help="Inception weights file (default: the FID's lookup)")
    parser.add_argument("--out", help="record path (default: print it only)")
    args = parser.parse_args(argv)
    args.rates = []
    t_start = time.perf_counter()

    root = Path(args.data)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise SystemExit(
                f"{root / split} is not a folder: --data needs train/ and test/ class folders "
                "(CIFAR-10's class-folder layout, as scripts/offline_run.sh unpacks them)"
            )
    test = data.load("cifar10", root=root / "train", split="test")
    train = data.load("cifar10", root=root / "train")
    n_train = min(args.train_size or len(train), len(train))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n_train]
    # the same subset as metrics.fid(..., reference_size=n_train) takes

    f_test = features("test", test.images, test.source, args)
    f_train = features("train", train.images[pick], f"{train.source}|seed0", args)
    half = len(test) // 2
    rows, fids = [], {}

    def add(key: str, model: str, a: torch.Tensor, b: torch.Tensor, dataset: str) -> None:
        fids[key] = metrics.frechet_distance(a, b)
        print(f"FID {fids[key]:7.3f}  {model}: {len(a):,} vs {len(b):,} images ({dataset})")
        rows.append(
            results.row(
                model,
                metrics.fid_label(len(a)),
                fids[key],
                dataset=dataset,
                samples=len(a),
                reference=len(b),
            )
        )

    label = args.label
    add("test_vs_train", "real test images", f_test, f_train, f"{label} test split vs train")
    add(
        "half_test_vs_train",
        "real test images (first half)",
        f_test[:half],
        f_train[:half],
        f"{label} test split vs train",
    )
    add(
        "half_vs_half",
        "real test images (first half)",
        f_test[:half],
        f_test[half:],
        f"{label} test split vs its other half",
    )
    jpeg = jpeg_settings(root / "test")
    if args.reencode and jpeg:
        n = min(args.reencode, len(test))
        again = reencode(test.images[:n], jpeg["quality"], jpeg["subsampling"])
        f_again = features(f"test-jpeg-q{jpeg['quality']}", again, f"{test.source}|again", args)
        add(
            "reencoded_vs_test",
            f"test images after one more JPEG pass (quality {jpeg['quality']})",
            f_again,
            f_test[:n],
            f"{label} test split vs itself",
        )
        jpeg["changed_pixel_fraction"] = float((again != test.images[:n]).float().mean())
        jpeg["mean_abs_change"] = float((again.float() - test.images[:n].float()).abs().mean())

    wall = time.perf_counter() - t_start
    record = results.benchmark_record(
        "FID floor: real test images against real training images",
        None,
        results.device_name(args.device),
        {
            "fid": fids,
            "n_test": len(test),
            "n_train": n_train,
            "n_train_total": len(train),
            "train_subset": "torch.randperm(seed 0), the first n_train (as metrics.fid's "
            "reference_size)",
            "jpeg": jpeg,
            "inception_images_per_s": [round(r, 2) for r in args.rates],
        },
        wall,
        dataset=label,
        rows=rows,
        in_tables=True,  # the results tables show it after the chapters' runs
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
