"""Data: 2-D toy distributions and image datasets, all behind two small interfaces.

* A 2-D distribution is any callable ``sample(n, generator=None) -> Tensor[n, 2]``; a plain
  ``sample(n)`` works too (:func:`toy` wraps it).
* An image dataset is an :class:`ImageData`: images in [-1, 1] (stored as uint8 where the
  source is 8-bit), integer labels, and :meth:`ImageData.batch` for random batches.

Methods take either, so a new toy or an image folder plugs in without touching them.
Downloading is explicit: nothing here fetches data unless ``download=True`` is passed.
Datasets live under ``$OSD_DATA_DIR`` (default ``~/.cache/osd/data``).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Sampler = Callable[..., Tensor]

# --------------------------------------------------------------------------------------
# 2-D toys
# --------------------------------------------------------------------------------------


def online(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on port 443 (a quick TCP connect, no request): can a download
    from it start?"""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _randn(n: int, d: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(n, d, generator=generator)


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator)


def eight_gaussians(
    n: int, generator: torch.Generator | None = None, radius: float = 4.0, std: float = 0.25
) -> Tensor:
    """Eight isotropic Gaussians on a circle of ``radius`` (the classic rectified-flow toy)."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * _randn(n, 2, generator)


def eight_gaussian_centers(radius: float = 4.0) -> Tensor:
    """The eight mode centres of :func:`eight_gaussians` (for counting modes hit)."""
    angle = torch.arange(8).float() * (2 * math.pi / 8)
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> Tensor:
    """Two interleaved half circles, scaled to roughly [-3, 3]^2."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * _rand(n, generator)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return pts + noise * _randn(n, 2, generator)


def checkerboard(n: int, generator: torch.Generator | None = None, size: float = 4.0) -> Tensor:
    """Uniform on the dark squares of a 4x4 checkerboard spanning [-size, size]^2."""
    x1 = _rand(n, generator) * 4 - 2
    x2_ = _rand(n, generator) - torch.randint(0, 2, (n,), generator=generator).float() * 2
    x2 = x2_ + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1) * (size / 2)


def spirals(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    """Two interleaved spirals, roughly in [-4, 4]^2."""
    r = torch.sqrt(_rand(n, generator)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    pts = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) * sign[:, None]
    return pts / 2.5 + noise * _randn(n, 2, generator)


def gaussian(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard 2-D Gaussian (the noise distribution)."""
    return _randn(n, 2, generator)


TOYS: dict[str, Sampler] = {
    "8gaussians": eight_gaussians,
    "moons": two_moons,
    "checkerboard": checkerboard,
    "spirals": spirals,
    "gaussian": gaussian,
}


def toy(name: str | Sampler) -> Sampler:
    """A 2-D sampler by name, or any callable passed through as ``sample(n, generator=None)``.

    A callable that takes only ``n`` (no ``generator`` argument) is wrapped: with a
    generator, it runs under torch's global RNG seeded from that generator, so its draws
    are as reproducible as the built-in toys' (numpy randomness inside it is not seeded)."""
    if callable(name):
        return name if _takes_generator(name) else _seeded(name)
    if name not in TOYS:
        raise ValueError(f"unknown 2-D distribution {name!r}; valid names are: {', '.join(TOYS)}")
    return TOYS[name]


def _takes_generator(fn: Callable) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the convention
        return True
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


def _seeded(fn: Callable[[int], Tensor]) -> Sampler:
    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        if generator is None:
            return fn(n)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(n)

    sample.__name__ = getattr(fn, "__name__", "sample")
    return sample


# --------------------------------------------------------------------------------------
# Image datasets
# --------------------------------------------------------------------------------------


def data_dir() -> Path:
    """Where datasets live: ``$OSD_DATA_DIR`` or ``~/.cache/osd/data``."""
    return Path(os.environ.get("OSD_DATA_DIR", Path.home() / ".cache" / "osd" / "data"))


def digest(tensors: dict[str, Tensor]) -> str:
    """A short hash of named tensors (names and bytes, in name order): what a cache entry was
    made from (a data set's images, a teacher's weights)."""
    h = hashlib.sha1()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:12]


@dataclass
class ImageData:
    """Images with labels.

    ``images`` is ``uint8`` in [0, 255] for 8-bit sources or ``float32`` already in [-1, 1];
    :meth:`batch` and :meth:`float_images` always return float in [-1, 1], channels first.
    """

    name: str
    images: Tensor
    labels: Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def description(self) -> str:
        """How the data was obtained, for result records (e.g. "cifar10 (class-folder copy)")."""
        kind = self.source.split(":", 1)[0]
        what = {"folder": "class-folder copy", "torchvision": "torchvision", "npz": "npz batches"}
        return f"{self.name} ({what.get(kind, self.source)}, {len(self)} images)"

    def fingerprint(self) -> str:
        """A short hash of the images' and labels' bytes: another copy of a data set unpacked
        to the same place, with the same name and size, gets another fingerprint."""
        return digest({"images": self.images, "labels": self.labels})

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def to_float(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1.0
        return images.float()

    def float_images(self) -> Tensor:
        return self.to_float(self.images)

    def batch(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A random batch (with replacement) ``(x in [-1, 1], y)``; reproducible given ``generator``."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.to_float(self.images[idx]), self.labels[idx]

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
        """Random split into (first, second) with ``fraction`` of the items in the second."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        k = int(round(len(self) * (1 - fraction)))
        a, b = perm[:k], perm[k:]
        return (
            ImageData(self.name, self.images[a], self.labels[a], self.class_names, self.source),
            ImageData(self.name, self.images[b], self.labels[b], self.class_names, self.source),
        )

    def __repr__(self) -> str:
        # a folder's name, not its whole path: reprs end up in stored notebook outputs
        kind, _, where = self.source.partition(":")
        source = f"{kind}:{Path(where).name}" if where else self.source
        return (
            f"ImageData({self.name!r}, n={len(self)}, shape={self.shape}, "
            f"classes={self.num_classes}, dtype={self.images.dtype}, source={source!r})"
        )


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 with rounding, the convention of FID tooling (EDM, torchcfm)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def digits() -> ImageData:
    """sklearn's bundled 8x8 digits (1,797 real images, offline), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(bunch.target)
    return ImageData("digits", x, y, [str(i) for i in range(10)], "sklearn.datasets.load_digits")


def _missing(what: str, looked: Path, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {looked}. {how}")


def cifar10(
    root: str | Path | None = None, train: bool = True, download: bool = False
) -> ImageData:
    """CIFAR-10 through torchvision. ``download=True`` fetches it into ``root``."""
    from torchvision.datasets import CIFAR10

    root = Path(root) if root is not None else data_dir() / "cifar10"
    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except (RuntimeError, FileNotFoundError) as err:  # not there, and no download asked for
        raise _missing(
            "CIFAR-10",
            root,
            "Pass download=True (the profile setting `download`), set OSD_DATA_DIR, or point "
            "`image_folder(...)` at a class-folder copy.",
        ) from err
    except OSError as err:  # the download failed (no network: URLError is an OSError)
        raise _missing(
            "CIFAR-10",
            root,
            f"The download failed ({err}). Without internet, unpack a class-folder copy to "
            "$OSD_DATA_DIR/cifar10/train (and test) or point `image_folder(...)` at one.",
        ) from err
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageData(
        "cifar10", x, torch.tensor(ds.targets), list(ds.classes), f"torchvision:{root}"
    )


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_folder(
    root: str | Path,
    size: int | None = None,
    name: str | None = None,
    progress: bool = True,
    cache: bool = True,
) -> ImageData:
    """A class-folder directory ``root/<class>/<image>`` (torchvision's ImageFolder layout).

    All images are decoded once into one uint8 tensor (CIFAR-10: 150 MB), which keeps
    training fast on any machine. ``size`` resizes (bicubic) when given. With ``cache``, the
    decoded tensor is kept under ``$OSD_CACHE_DIR/decoded/`` (keyed by the folder, its file
    list and modification times), so the next chapter loads it in a fraction of a second
    instead of decoding 50,000 files again.
    """
    import hashlib

    from PIL import Image
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise _missing(
            "image folder", root, "Give the directory that holds one sub-folder per class."
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).iterdir())
        if p.suffix.lower() in _IMAGE_EXTS
    ]
    if not files:
        raise _missing(
            "images", root, f"Expected {root}/<class>/<image> with one of {_IMAGE_EXTS}."
        )
    name = name or root.name
    key = hashlib.sha1(
        repr(
            (str(root.resolve()), size, [(str(p.relative_to(root)), i) for p, i in files])
        ).encode()
        + repr(max(p.stat().st_mtime for p, _ in files)).encode()
    ).hexdigest()[:12]
    cached = _decoded_cache() / f"{name}-{len(files)}-{key}.npz"
    if cache and cached.exists():
        with np.load(cached) as f:
            x, y = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
        return ImageData(name, x, y, classes, f"folder:{root}")
    arrays, labels = [], []
    from .train import show_progress

    for path, label in tqdm(
        files, desc=f"decoding {root.name}", disable=not show_progress(progress)
    ):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(im))
        labels.append(label)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels)
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.npz")  # atomic: write, then rename
        np.savez(tmp, images=x.numpy(), labels=y.numpy())
        os.replace(tmp, cached)
    return ImageData(name, x, y, classes, f"folder:{root}")


def write_class_zip(
    data: ImageData,
    path: str | Path,
    split: str = "train",
    jpeg_quality: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``data`` as a zip of ``<split>/<class>/<NNNNN>.png`` (or ``.jpg``): the layout
    :func:`image_folder` reads once unpacked, and that ``scripts/offline_run.sh`` takes to a
    GPU node without internet.

    PNG keeps the exact pixels; ``jpeg_quality`` (e.g. 75, 4:2:0 chroma subsampling) writes a
    smaller lossy copy instead, whose results must say so. Folders are named by
    ``data.class_names``; :func:`image_folder` numbers classes in the sorted order of those
    names (as torchvision's ImageFolder does), so they must sort in label order. Within a
    class the images keep their order. The zip's entries carry a fixed date, so the same
    images give the same bytes; it is written to a temporary file and renamed at the end.
    """
    import io
    import zipfile

    from PIL import Image
    from tqdm import tqdm

    from .train import show_progress

    names = data.class_names or [str(i) for i in range(data.num_classes)]
    if names != sorted(names) or len(set(names)) != len(names):
        raise ValueError(
            f"class names must be distinct and sort in label order (image_folder reads the "
            f"folders sorted), got {names}"
        )
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 95:
        raise ValueError(f"jpeg_quality must be in 1..95, got {jpeg_quality}")
    if data.shape[0] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {data.shape}")
    images = data.images if data.images.dtype == torch.uint8 else to_uint8(data.images)
    ext = "png" if jpeg_quality is None else "jpg"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    counts = [0] * len(names)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # PNG/JPEG: already compressed
        for i in tqdm(
            range(len(data)), desc=f"writing {path.name}", disable=not show_progress(progress)
        ):
            label = int(data.labels[i])
            array = images[i].permute(1, 2, 0).numpy()
            image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            buffer = io.BytesIO()
            if jpeg_quality is None:
                image.save(buffer, format="PNG")
            else:
                image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling="4:2:0")
            entry = f"{split}/{names[label]}/{counts[label]:05d}.{ext}"
            counts[label] += 1
            zf.writestr(zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    os.replace(tmp, path)
    return path


def export_cifar10(
    out: str | Path,
    root: str | Path | None = None,
    download: bool = False,
    jpeg_quality: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """CIFAR-10 from torchvision's files (``download=True`` fetches them into ``root``) as
    ``out/train.zip`` and ``out/test.zip`` (:func:`write_class_zip`), ready for
    ``scripts/offline_run.sh KIT out OUT`` on a node without internet."""
    paths = []
    for split in ("train", "test"):
        data = cifar10(root, train=split == "train", download=download)
        paths.append(
            write_class_zip(data, Path(out) / f"{split}.zip", split, jpeg_quality, progress)
        )
    return paths


def _main(argv: list[str] | None = None) -> None:
    import argparse
    import hashlib

    parser = argparse.ArgumentParser(
        prog="python -m osdlib.data",
        description="Write CIFAR-10 as class-folder zips (train.zip, test.zip) for "
        "scripts/offline_run.sh on a GPU node without internet.",
    )
    parser.add_argument("--export-cifar10", metavar="DIR", required=True, help="where to write")
    parser.add_argument(
        "--root", help="torchvision's CIFAR-10 folder (default: $OSD_DATA_DIR/cifar10)"
    )
    parser.add_argument("--download", action="store_true", help="fetch CIFAR-10 first")
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        help="write JPEG at this quality instead of PNG (smaller, lossy: label the results)",
    )
    args = parser.parse_args(argv)
    try:
        paths = export_cifar10(args.export_cifar10, args.root, args.download, args.jpeg_quality)
    except FileNotFoundError as err:
        hint = (
            "Run this where the download works, or give --root DIR"
            if args.download
            else "Here: --download, or --root DIR"
        )
        raise SystemExit(f"{err} {hint} (the folder holding cifar-10-batches-py).") from None
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for p in paths:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"wrote {p.resolve()} ({p.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    label = (
        "CIFAR-10" if args.jpeg_quality is None else f"CIFAR-10 (JPEG copy, q{args.jpeg_quality})"
    )
    print(
        f'then, on the node: OSD_DATASET_LABEL="{label}" scripts/offline_run.sh KIT '
        f"{args.export_cifar10} OUT"
    )


def _decoded_cache() -> Path:
    from .teachers import cache_dir

    return cache_dir() / "decoded"


def imagenet64_npz(
    root: str | Path | None = None, split: str = "train", max_files: int | None = None
) -> ImageData:
    """Downsampled ImageNet 64x64 from its published npz batches.

    Each file holds ``data`` uint8 (N, 12288), channel-major (all R, then G, then B), and
    ``labels`` in 1..1000. Train files are ``train_data_batch_*.npz``, validation
    ``val_data.npz``. The whole train set needs about 16 GB of memory; ``max_files`` limits it.
    """
    root = Path(root) if root is not None else data_dir() / "imagenet64"
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data*.npz"
    paths = sorted(glob.glob(str(root / pattern)), key=lambda p: (len(p), p))[:max_files]
    if not paths:
        raise _missing(
            f"ImageNet-64 {split} npz files ({pattern})",
            root,
            "Download the 64x64 downsampled ImageNet npz batches from image-net.org into this "
            "directory (or set OSD_DATA_DIR), or use image_folder(...) on a class-folder copy.",
        )
    xs, ys = [], []
    for p in paths:
        with np.load(p) as f:
            xs.append(f["data"].reshape(-1, 3, 64, 64))
            ys.append(np.asarray(f["labels"]).astype(np.int64) - 1)
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return ImageData("imagenet64", x, y, [str(i) for i in range(1000)], f"npz:{root}")


def write_imagenet64_npz(path: str | Path, images: Tensor, labels: Tensor) -> None:
    """Write images (N, 3, 64, 64) uint8 and 0-based labels in the published npz format."""
    data = images.to(torch.uint8).reshape(len(images), -1).numpy()
    np.savez(path, data=data, labels=(labels.long() + 1).numpy())


DATASETS = ("digits", "cifar10", "imagenet64", "folder:<path>")


def load(
    name: str, download: bool = False, root: str | Path | None = None, split: str = "train"
) -> ImageData:
    """An image dataset by name: ``digits``, ``cifar10``, ``imagenet64`` or ``folder:<path>``.

    A ``cifar10`` request uses a class-folder copy when one is there (``root``, else
    ``$OSD_DATA_DIR/cifar10/<split>``; e.g. a JPEG copy), else torchvision's files.
    ``split="test"`` asks for CIFAR-10's test set: the ``test`` folder beside a ``train``
    class folder, or torchvision's test batch.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and name != "cifar10":
        raise ValueError(f"a test split is only known for cifar10, not {name!r}")
    if name == "digits":
        return digits()
    if name == "cifar10":
        folder = Path(root) if root is not None else data_dir() / "cifar10" / "train"
        if split == "test":
            folder = folder.parent / "test" if folder.name == "train" else folder / "test"
        if folder.is_dir() and any(d.is_dir() for d in folder.iterdir()):
            return image_folder(folder, name="cifar10" if split == "train" else "cifar10-test")
        tv_root = None if root is None else root
        data = cifar10(root=tv_root, train=split == "train", download=download)
        if split == "test":
            data.name = "cifar10-test"
        return data
    if name == "imagenet64":
        return imagenet64_npz(root)
    if name.startswith("folder:"):
        return image_folder(name.split(":", 1)[1])
    raise ValueError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")


if __name__ == "__main__":
    _main()
