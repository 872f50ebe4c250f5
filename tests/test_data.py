import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from osdlib import data


@pytest.mark.parametrize("name", ["8gaussians", "moons", "checkerboard", "spirals", "gaussian"])
def test_toys_shape_and_reproducible(name):
    s = data.toy(name)
    a = s(500, generator=torch.Generator().manual_seed(0))
    b = s(500, generator=torch.Generator().manual_seed(0))
    assert a.shape == (500, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    assert a.abs().max() < 8


def test_toy_accepts_any_callable_and_rejects_unknown_names():
    def ring(n, generator=None):
        return torch.randn(n, 2, generator=generator)

    assert data.toy(ring) is ring
    with pytest.raises(ValueError, match="8gaussians, moons, checkerboard, spirals"):
        data.toy("swissroll")


def test_plain_sample_n_callable_is_wrapped_reproducibly():
    def ring(n):  # no generator argument: uses torch's global RNG
        a = 2 * torch.pi * torch.rand(n)
        return torch.stack([a.cos(), a.sin()], 1) * 3

    s = data.toy(ring)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a, b = s(100, generator=g()), s(100, generator=g())
    assert a.shape == (100, 2) and torch.equal(a, b)
    assert not torch.equal(a, s(100, generator=torch.Generator().manual_seed(5)))
    assert s(7).shape == (7, 2)  # without a generator it is just called


def test_train_2d_accepts_a_plain_sample_n_callable():
    from osdlib import nets
    from osdlib.methods import flow_matching

    torch.manual_seed(0)
    run = flow_matching.train_2d(
        nets.build("mlp-2d", (2,), hidden=16),
        lambda n: torch.randn(n, 2) + 3.0,
        steps=3,
        batch=32,
        progress=False,
    )
    assert run.steps == 3 and all(torch.isfinite(torch.tensor(run.history["loss"])))


def test_digits_are_real_and_scaled():
    d = data.digits()
    assert len(d) == 1797 and d.shape == (1, 8, 8) and d.num_classes == 10
    x = d.float_images()
    assert x.min() == -1.0 and x.max() == 1.0
    xb, yb = d.batch(32, generator=torch.Generator().manual_seed(0))
    assert xb.shape == (32, 1, 8, 8) and yb.dtype == torch.long


def _random_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_image_folder_png_exact_and_jpeg(tmp_path):
    imgs = _random_images(6, 12)
    for i, arr in enumerate(imgs):
        cls = ["cat", "airplane", "dog"][i % 3]
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / cls / f"{i:04d}.png")
        Image.fromarray(arr).save(tmp_path / cls / f"{i:04d}.jpg", quality=95)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = data.image_folder(tmp_path, progress=False)
    assert d.class_names == ["airplane", "cat", "dog"]  # sorted, like torchvision's ImageFolder
    assert len(d) == 12 and d.shape == (3, 12, 12) and d.images.dtype == torch.uint8
    # first file of class "airplane" is 0001.jpg, then 0001.png (sorted names)
    png = d.images[1].permute(1, 2, 0).numpy()
    assert np.array_equal(png, imgs[1])
    resized = data.image_folder(tmp_path, size=8, progress=False)
    assert resized.shape == (3, 8, 8)
    assert data.load(f"folder:{tmp_path}").shape == (3, 12, 12)
    assert str(tmp_path) not in repr(d)  # reprs land in stored outputs: no machine paths


def test_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        data.image_folder(tmp_path / "nothing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="<class>/<image>"):
        data.image_folder(tmp_path / "empty")


def test_imagenet64_npz_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 64, 64), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 999, 5, 7, 1])
    data.write_imagenet64_npz(tmp_path / "train_data_batch_1.npz", imgs[:3], labels[:3])
    data.write_imagenet64_npz(tmp_path / "train_data_batch_2.npz", imgs[3:], labels[3:])
    raw = np.load(tmp_path / "train_data_batch_1.npz")
    assert raw["data"].shape == (3, 12288) and raw["labels"].min() >= 1  # the published format
    # channel-major: the first 4096 values are the red plane
    assert np.array_equal(raw["data"][0, :4096], imgs[0, 0].flatten().numpy())
    d = data.imagenet64_npz(tmp_path)
    assert torch.equal(d.images, imgs) and torch.equal(d.labels, labels)
    assert d.num_classes == 1000


def test_imagenet64_missing_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.imagenet64_npz(tmp_path)


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.cifar10(tmp_path, download=False)


def test_cifar10_failed_download_says_what_to_do(tmp_path, monkeypatch):
    """Offline, torchvision's download raises URLError (an OSError): one clear message."""
    import urllib.error

    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(FileNotFoundError, match="download failed.*class-folder copy"):
        data.cifar10(tmp_path, download=True)


def _torchvision_cifar10(root, monkeypatch, classes=None):
    """CIFAR-10's python pickle format in ``root``: 4 images per train batch file, 4 in the
    test batch; returns the 20 train images (N, H, W, C)."""
    import torchvision.datasets.cifar as cifar_module
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    imgs = _random_images(24, 32)
    flat = imgs.transpose(0, 3, 1, 2).reshape(24, -1)
    for i, (name, _) in enumerate(CIFAR10.train_list + CIFAR10.test_list):
        sl = slice(4 * i, 4 * i + 4)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat[sl], "labels": [k % 10 for k in range(24)][sl]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes or [f"c{i}" for i in range(10)]}, f)
    # the fixture files have other md5 sums than the published ones
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda *a, **k: True)
    return imgs[:20]


def test_cifar10_torchvision_format(tmp_path, monkeypatch):
    """Write the CIFAR-10 python pickle format and read it through torchvision's loader."""
    imgs = _torchvision_cifar10(tmp_path, monkeypatch)
    d = data.cifar10(tmp_path)
    assert len(d) == 20 and d.shape == (3, 32, 32)
    assert np.array_equal(d.images[0].permute(1, 2, 0).numpy(), imgs[0])
    assert d.class_names[0] == "c0" and d.labels[:12].tolist() == [*range(10), 0, 1]


def _unzip(path, to):
    import zipfile

    with zipfile.ZipFile(path) as zf:
        zf.extractall(to)
        return sorted(zf.namelist())


def test_class_zip_round_trip(tmp_path):
    """PNG zips unpack to what image_folder reads back exactly (labels, classes, pixels,
    in class order); the same images give the same bytes; JPEG is close, grey stays grey."""
    imgs = torch.from_numpy(_random_images(7, 8)).permute(0, 3, 1, 2)
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    d = data.ImageData("toy", imgs, labels, ["a", "b", "c"])
    path = data.write_class_zip(d, tmp_path / "train.zip", progress=False)
    assert path.read_bytes() == data.write_class_zip(d, tmp_path / "again.zip").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    names = _unzip(path, tmp_path / "png")
    assert names[:2] == ["train/a/00000.png", "train/a/00001.png"] and len(names) == 7
    back = data.image_folder(tmp_path / "png" / "train", progress=False, cache=False)
    order = torch.argsort(labels, stable=True)
    assert back.class_names == ["a", "b", "c"] and torch.equal(back.labels, labels[order])
    assert torch.equal(back.images, imgs[order])

    smooth = torch.linspace(0, 255, 64).reshape(1, 1, 8, 8).expand(2, 3, 8, 8).to(torch.uint8)
    jpeg = data.ImageData("toy", smooth, torch.tensor([0, 1]), ["a", "b"])
    names = _unzip(data.write_class_zip(jpeg, tmp_path / "t.zip", "test", 75), tmp_path / "j")
    assert names == ["test/a/00000.jpg", "test/b/00000.jpg"]
    back = data.image_folder(tmp_path / "j" / "test", progress=False, cache=False)
    assert (back.images.float() - smooth.float()).abs().mean() < 8

    digits = data.digits()
    small = data.ImageData("digits", digits.images[:5], digits.labels[:5], digits.class_names)
    _unzip(data.write_class_zip(small, tmp_path / "d.zip", progress=False), tmp_path / "d")
    back = data.image_folder(tmp_path / "d" / "train", progress=False, cache=False)
    grey = data.to_uint8(small.images)[torch.argsort(small.labels, stable=True)]
    assert torch.equal(back.images, grey.expand(-1, 3, -1, -1))  # 1 channel -> RGB, exact


def test_class_zip_refuses_what_image_folder_would_misread(tmp_path):
    d = data.ImageData("toy", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sort in label order"):
        data.write_class_zip(
            data.ImageData(d.name, d.images, d.labels, ["dog", "cat"]), tmp_path / "x.zip"
        )
    with pytest.raises(ValueError, match="jpeg_quality"):
        data.write_class_zip(d, tmp_path / "x.zip", jpeg_quality=100)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_cifar10_command(tmp_path, monkeypatch, capsys):
    """`python -m osdlib.data --export-cifar10 DIR` writes train.zip and test.zip from
    torchvision's files; without them it says to pass --download."""
    with pytest.raises(SystemExit, match="--download"):
        data._main(["--export-cifar10", str(tmp_path / "zips"), "--root", str(tmp_path)])
    imgs = _torchvision_cifar10(tmp_path, monkeypatch)
    data._main(["--export-cifar10", str(tmp_path / "zips"), "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "train.zip" in out and "test.zip" in out and "offline_run.sh" in out
    assert len(_unzip(tmp_path / "zips" / "test.zip", tmp_path / "u")) == 4
    _unzip(tmp_path / "zips" / "train.zip", tmp_path / "u")
    back = data.image_folder(tmp_path / "u" / "train", progress=False, cache=False)
    assert len(back) == 20 and back.class_names == [f"c{i}" for i in range(10)]
    assert np.array_equal(back.images[0].permute(1, 2, 0).numpy(), imgs[0])  # c0's first


def test_load_names_and_cifar_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="digits, cifar10, imagenet64"):
        data.load("mnist")
    monkeypatch.setenv("OSD_DATA_DIR", str(tmp_path))
    for c in ("airplane", "automobile"):
        (tmp_path / "cifar10" / "train" / c).mkdir(parents=True)
        Image.fromarray(_random_images(1, 32)[0]).save(tmp_path / "cifar10" / "train" / c / "0.jpg")
    d = data.load("cifar10")
    assert d.name == "cifar10" and len(d) == 2 and d.source.startswith("folder:")


def test_to_uint8_rounds():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert data.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]


def test_image_folder_caches_the_decoded_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for i, arr in enumerate(_random_images(4, 8)):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i}.png")
    first = data.image_folder(root, progress=False)
    (cached,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    again = data.image_folder(root, progress=False)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    # a new file is a new data set: decoded again, under another key
    Image.fromarray(_random_images(1, 8)[0]).save(root / "c0" / "9.png")
    assert len(data.image_folder(root, progress=False)) == 5
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 2
    assert len(data.image_folder(root, progress=False, cache=False)) == 5
    assert cached.exists()


def test_load_cifar_test_split_beside_train(tmp_path):
    for split in ("train", "test"):
        for c in ("airplane", "automobile"):
            (tmp_path / split / c).mkdir(parents=True)
            img = Image.fromarray(_random_images(1, 32)[0])
            for i in range(2 if split == "train" else 1):
                img.save(tmp_path / split / c / f"{i}.png")
    train_set = data.load("cifar10", root=tmp_path / "train")
    test_set = data.load("cifar10", root=tmp_path / "train", split="test")
    assert (len(train_set), len(test_set)) == (4, 2)
    assert test_set.name == "cifar10-test" and test_set.class_names == train_set.class_names
    with pytest.raises(ValueError, match="only known for cifar10"):
        data.load("digits", split="test")
