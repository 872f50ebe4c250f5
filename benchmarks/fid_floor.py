"""The FID floor of real CIFAR-10: the test images against the training images.

    python benchmarks/fid_floor.py --data DIR --out results/benchmarks/fid-floor-<device>.json

``DIR`` holds CIFAR-10 as class folders, ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``
(a JPEG copy, say). A model that does not copy its training images comes no closer to them
than images of the same distribution that it never saw, so this FID is the floor under the
book's CIFAR-10 FIDs. Measured with the book's FID protocol
(:func:`osdlib.metrics.inception_features`: torch-fidelity's Inception, the same weights):

* all 10,000 test images against the training images (all 50,000 by default, the usual
  protocol; ``--train-size`` takes a fixed random subset, the one that
  ``metrics.fid(..., reference_size=n)`` takes);
* half the test images (5,000, half of every class, drawn at random) against the same
  training images: the `gpu` profile's FID-5k against 50k has this floor. (The `paper`
  profile's 50k samples have none: the test set holds 10k.)
* that half against the other half: the same distribution, so what is left is what a finite
  number of images adds (FID is biased upwards, more so for fewer images);
* with ``--reencode N`` and a JPEG copy, N test images of that half against themselves after
  one more JPEG pass with the copy's own quantisation tables. A second pass with the same
  tables changes the pixels less than the first did, so this most likely understates how
  far the copy's JPEG encoding moved Inception's statistics from the original pixels.

Each set's features are kept under ``$OSD_CACHE_DIR/fid/features`` (keyed by the images'
bytes and the weights file), so a stopped run starts again where it was. Inception-v3 at
299x299 runs at about 7 images/s on two CPU cores (10k images: about 25 minutes; all 60k:
about 2.5 hours) and thousands per second on a GPU.
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


def _encode(x: np.ndarray, **save):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", **save)
    return Image.open(buf)


def jpeg_settings(folder: Path) -> dict:
    """How a folder's JPEG files were written, from the first file: its quantisation tables
    (``qtables``), chroma subsampling, and the libjpeg quality whose standard tables are
    exactly these (``None`` when no quality gives them); ``{}`` if it holds no JPEG."""
    from PIL import Image, JpegImagePlugin

    first = next(
        (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")), None
    )
    if first is None:
        return {}
    with Image.open(first) as im:
        qtables = {k: list(v) for k, v in im.quantization.items()}
        sampling = JpegImagePlugin.get_sampling(im)
    names = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
    blank = np.zeros((8, 8, 3), np.uint8)
    quality = next(  # libjpeg (through PIL) writes its standard tables scaled to the quality
        (q for q in range(1, 101) if _encode(blank, quality=q).quantization[0] == qtables[0]),
        None,
    )
    return {"quality": quality, "subsampling": names.get(sampling), "qtables": qtables}


def reencode(images: torch.Tensor, qtables: dict, subsampling: str) -> torch.Tensor:
    """uint8 RGB images (N, 3, H, W) after one more JPEG pass (PIL/libjpeg) with the given
    quantisation tables and chroma subsampling, decoded again."""
    out = torch.empty_like(images)
    for i, x in enumerate(images):
        im = _encode(x.permute(1, 2, 0).numpy(), qtables=qtables, subsampling=subsampling)
        with im:
            out[i] = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return out


def halves(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of a labelled set, each with half of every class, drawn at random
    and shuffled (a class-folder set is sorted by class: its first half is other classes)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    a, b = torch.cat(a), torch.cat(b)
    return a[torch.randperm(len(a), generator=g)], b[torch.randperm(len(b), generator=g)]


def features(name: str, images: torch.Tensor, weights: Path | None, args) -> torch.Tensor:
    """Inception features of a set, from the cache when these images were done before."""
    wname = weights.name if weights else "torch-fidelity"
    key = hashlib.sha1(images.contiguous().numpy().tobytes() + wname.encode()).hexdigest()[:12]
    path = metrics.fid_cache_dir() / "features" / f"{name}-{len(images)}-{key}.pt"
    if path.is_file():
        print(f"{name}: {len(images):,} images, features from {path}")
        args.sets[name] = {"images": len(images), "features": "from the cache of an earlier run"}
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
    args.sets[name] = {"images": len(images), "features": "computed", "seconds": round(dt, 1)}
    args.sets[name]["images_per_s"] = round(len(images) / dt, 2)
    return f


def sample_size_fit(rows: list[dict], n_test: int, n_train: int) -> dict:
    """FID's finite-sample bias, fitted: FID = distance + c (1/n1 + 1/n2) over rows of real
    images of one distribution (train and test are i.i.d. draws), least squares; the bias of a
    Frechet distance of Gaussians fitted to n samples falls like 1/n. ``predicted`` is the fit
    at all ``n_train`` training images against ``n_test`` test images (an extrapolation where
    the rows used fewer); ``residuals`` say how well the form fits."""
    x = np.array([1 / r["samples"] + 1 / r["reference"] for r in rows])
    y = np.array([r["value"] for r in rows])
    (distance, c), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    return {
        "form": "FID = distance + c * (1/n1 + 1/n2)",
        "distance": float(distance),
        "c": float(c),
        "residuals": [float(v) for v in y - (distance + c * x)],
        "predicted": float(distance + c * (1 / n_test + 1 / n_train)),
        "predicted_at": [n_train, n_test],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and test/ class folders")
    parser.add_argument(
        "--train-size", type=int, default=0, help="a random subset of the training images; 0: all"
    )
    parser.add_argument("--reencode", type=int, default=5000, help="test images to JPEG again")
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
    args.sets = {}  # each set's features: computed here (how fast) or from the cache
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
    pick = metrics.reference_subset(len(train), n_train)  # as fid(..., reference_size=n_train)
    weights = metrics.inception_weights(args.weights)

    f_test = features("test", test.images, weights, args)
    f_train = features("train", train.images[pick], weights, args)
    a, b = halves(test.labels)
    rows, fids = [], {}

    def add(key: str, model: str, x: torch.Tensor, y: torch.Tensor) -> None:
        fids[key] = metrics.frechet_distance(x, y)
        print(f"FID {fids[key]:7.3f}  {model}: {len(x):,} vs {len(y):,} images")
        row = results.row(model, metrics.fid_label(len(x)), fids[key], dataset=args.label)
        rows.append(row | {"samples": len(x), "reference": len(y)})

    add("test_vs_train", "all test images vs training images", f_test, f_train)
    add("half_vs_train", "half the test images vs training images", f_test[a], f_train)
    add("half_vs_half", "half the test images vs the other half", f_test[a], f_test[b])
    bias = sample_size_fit(rows, len(test), len(train))
    print(
        f"FID ~ {bias['distance']:.3f} + {bias['c']:.0f} (1/n1 + 1/n2) over the rows above; "
        f"at {len(train):,} vs {len(test):,} images that gives {bias['predicted']:.2f}"
    )
    jpeg = jpeg_settings(root / "test")
    if args.reencode and jpeg.get("subsampling"):
        first = a[: args.reencode]
        again = reencode(test.images[first], jpeg["qtables"], jpeg["subsampling"])
        f_again = features("test-again", again, weights, args)
        add(
            "again_vs_test",
            "test images after one more JPEG pass vs before",
            f_again,
            f_test[first],
        )
        change = again.float() - test.images[first].float()
        jpeg |= {"changed_pixel_fraction": float((change != 0).float().mean())}
        jpeg |= {"mean_abs_change": float(change.abs().mean())}
    elif args.reencode:
        print("no JPEG pass measured: the test folder holds no JPEG files with RGB subsampling")
    jpeg.pop("qtables", None)

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
            "train_subset": "metrics.reference_subset (as fid's reference_size)",
            "sample_size_fit": bias,
            "test_halves": "half of every class each, drawn with seed 0",
            "half_class_counts": torch.bincount(test.labels[a]).tolist(),
            "jpeg": jpeg,
            "fid_weights": weights.name if weights else "torch-fidelity's download",
            "feature_sets": args.sets,
        },
        wall,
        dataset=args.label,
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
