"""Distances between predictions and targets, per sample (shape (B,)), shared by methods.

* ``l2`` — mean squared error over the sample's dimensions.
* ``pseudo_huber`` — sqrt(||a - b||^2 + c^2) - c over the **whole sample vector** (not per
  pixel), with c = 0.00054 * sqrt(dim) by default, as in improved consistency training.
* ``lpips`` — LPIPS (VGG16) through torch-fidelity; its weights are downloaded on first
  use, so it is an option for machines with internet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

Distance = Callable[[Tensor, Tensor], Tensor]


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return (a - b).pow(2).flatten(1).mean(1)


def pseudo_huber_c(dim: int) -> float:
    """The iCT constant c = 0.00054 * sqrt(d) for samples of dimension d."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c on the whole vector."""
    diff = (a - b).flatten(1)
    c = pseudo_huber_c(diff.shape[1]) if c is None else c
    return torch.sqrt(diff.pow(2).sum(1) + c**2) - c


class LPIPS(torch.nn.Module):
    """LPIPS-VGG16 distance via torch-fidelity (inputs in [-1, 1], resized to 224 if smaller).

    Its two weight files (torch-fidelity's LPIPS heads and torchvision's VGG16) are downloaded
    into the torch hub cache on first use. The module moves itself to its inputs' device, so a
    training loop can take it from :func:`distance` without placing it.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch_fidelity.sample_similarity_lpips import SampleSimilarityLPIPS

        try:
            self.net = SampleSimilarityLPIPS("lpips-vgg16", sample_similarity_resize=224)
        except OSError as err:  # a failed download (URLError) is an OSError
            files = lpips_files()
            raise RuntimeError(
                f"LPIPS needs its weights, downloaded on first use, and the download failed "
                f"({err}). Run once where the internet is reachable (the files, "
                f"{', '.join(f.name for f in files)}, go to {files[0].parent}, from where they "
                f"can be copied), or choose another distance: "
                f"{', '.join(d for d in DISTANCES if d != 'lpips')}."
            ) from err
        self.requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if next(self.net.parameters()).device != a.device:
            self.to(a.device)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        # torch-fidelity's LPIPS takes images in [0, 255]
        return self.net((a.clamp(-1, 1) + 1) * 127.5, (b.clamp(-1, 1) + 1) * 127.5).reshape(-1)


def lpips_files() -> list[Path]:
    """The weight files LPIPS loads from the torch hub cache, where the first use downloads
    them: torch-fidelity's LPIPS heads and torchvision's VGG16 (copy them there to run
    LPIPS on a machine without internet)."""
    import torchvision
    from torch_fidelity.sample_similarity_lpips import URL_VGG16_LPIPS

    urls = (URL_VGG16_LPIPS, torchvision.models.VGG16_Weights.IMAGENET1K_V1.url)
    return [Path(torch.hub.get_dir()) / "checkpoints" / u.rsplit("/", 1)[1] for u in urls]


DISTANCES = ("l2", "pseudo_huber", "lpips")


def distance(name: str) -> Distance:
    """A per-sample distance by name (see the module docstring)."""
    if name == "l2":
        return l2
    if name == "pseudo_huber":
        return pseudo_huber
    if name == "lpips":
        return LPIPS()
    raise ValueError(f"unknown distance {name!r}; valid names are: {', '.join(DISTANCES)}")
