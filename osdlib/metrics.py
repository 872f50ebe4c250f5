"""Metrics: FID (torch-fidelity, standard protocol), an offline proxy, 2-D distances, timing.

* :func:`fid` — Frechet Inception Distance through torch-fidelity: samples rounded to uint8,
  Inception-v3 pool features (the TF-compatible port), compared with a reference set. The
  standard protocol is 50k samples against the training set. Inception weights are
  downloaded by torch-fidelity on first use; offline, pass ``weights_path`` (or set
  ``OSD_INCEPTION_WEIGHTS``) to a local copy of ``pt_inception-2015-12-05-6726825d.pth``.
* :func:`proxy_fd` — **a proxy, not FID**: the same Frechet distance in the feature space of
  the small classifier the book trains (:class:`osdlib.nets.SmallClassifier`). It runs
  anywhere, but its numbers are not comparable with any published FID.
* :func:`sliced_wasserstein` and :func:`energy_distance` for 2-D samples;
  :func:`straightness` of a flow's ODE paths.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
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


def fid(
    samples: Tensor,
    reference: ImageData | Tensor | str,
    weights_path: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 200,
    feature_extractor: str = "inception-v3-compat",
    cache_name: str | None = None,
    verbose: bool = False,
) -> float:
    """FID between ``samples`` ([-1, 1] floats or uint8) and ``reference``.

    ``reference`` is an :class:`ImageData`, a uint8 tensor, or the name of a torch-fidelity
    registered dataset (``"cifar10-train"``, downloaded by torch-fidelity). ``cache_name``
    caches the reference statistics under torch-fidelity's cache.
    """
    import torch_fidelity

    weights_path = weights_path or os.environ.get("OSD_INCEPTION_WEIGHTS")
    if isinstance(reference, ImageData):
        reference = reference.images
    ref = reference if isinstance(reference, str) else _UInt8Images(reference)
    kwargs = dict(
        input1=_UInt8Images(samples),
        input2=ref,
        fid=True,
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        feature_extractor=feature_extractor,
        verbose=verbose,
        samples_shuffle=False,
        input2_cache_name=cache_name,
        cache=cache_name is not None,
    )
    if weights_path:
        kwargs["feature_extractor_weights_path"] = str(weights_path)
    try:
        out = torch_fidelity.calculate_metrics(**kwargs)
    except (OSError, RuntimeError) as err:  # typically: weights could not be downloaded
        raise RuntimeError(
            f"FID failed ({err}). On a machine without internet, download the Inception "
            "weights (pt_inception-2015-12-05-6726825d.pth, linked from torch-fidelity) and pass "
            "weights_path=... or set OSD_INCEPTION_WEIGHTS."
        ) from err
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
) -> tuple[nn.Module, dict]:
    """Train :class:`~osdlib.nets.SmallClassifier` on a split of ``data``.

    Returns the classifier (eval mode) and ``{"test_accuracy", "train_wall_s", ...}``
    measured on the held-out ``holdout`` fraction.
    """
    from .nets import SmallClassifier
    from .train import train

    train_set, test_set = data.split(holdout, seed=seed)
    width = 32 if data.shape[-1] <= 16 else 64
    with torch.random.fork_rng():  # the same initial weights whatever ran before
        torch.manual_seed(seed)
        net = SmallClassifier(data.shape[0], data.num_classes, width=width)

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
        desc="classifier (for the proxy metric)",
    )
    clf = result.model.eval()
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


def proxy_fd(classifier: nn.Module, samples: Tensor, reference: Tensor, device="cpu") -> float:
    """The offline proxy: Frechet distance in the classifier's feature space (**not FID**)."""
    return frechet_distance(
        proxy_features(classifier, samples, device), proxy_features(classifier, reference, device)
    )


def get_classifier(
    settings: dict,
    data: ImageData,
    retrain: bool = False,
    root: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The book's classifier for ``data``: loaded from the cache, or trained and cached."""
    from .nets import SmallClassifier
    from .teachers import cache_dir
    from .train import load_weights, save_weights

    steps, seed = settings["classifier_steps"], settings["seed"]
    folder = Path(root or cache_dir()) / "classifiers" / f"{data.name}-{len(data)}-{steps}-{seed}"
    weights = folder / "classifier.safetensors"
    if weights.exists() and not retrain:
        width = 32 if data.shape[-1] <= 16 else 64
        clf = load_weights(SmallClassifier(data.shape[0], data.num_classes, width=width), weights)
        info = json.loads((folder / "info.json").read_text())
        return clf.to(settings.get("device", "cpu")).eval(), {**info, "trained_now": False}
    clf, info = train_classifier(
        data, steps, seed=seed, device=settings.get("device", "cpu"), progress=progress
    )
    save_weights(clf, weights)
    (folder / "info.json").write_text(json.dumps(info))
    return clf, {**info, "trained_now": True}


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
    "train_classifier",
    "accuracy",
    "within_class_std",
    "proxy_features",
    "proxy_fd",
    "get_classifier",
    "sliced_wasserstein",
    "energy_distance",
    "modes_hit",
    "straightness",
    "Timer",
    "throughput",
]
