"""Flow matching (= 1-rectified flow): the teacher of the book.

Convention (see :mod:`osdlib.paths`): x_t = (1 - t) x + t z, t ~ U[0, 1], z ~ N(0, I);
the network regresses the conditional velocity z - x:

    L(theta) = E_{x, z, t} || v_theta(x_t, t, y) - (z - x) ||^2.

Its minimiser is the marginal velocity v*(x_t, t) = E[z - x | x_t], whose ODE
dx/dt = v*(x, t), integrated from t = 1 to 0, carries N(0, I) to the data distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import paths
from ..data import toy as as_sampler
from ..train import TrainResult, train


def loss(
    net: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """The flow-matching loss on a batch of data ``x`` (any shape) with optional labels.

    ``z`` defaults to fresh independent noise (flow matching = 1-rectified flow); passing
    the noise each ``x`` was generated from gives reflow on a coupling (chapter 01).
    """
    if z is None:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)
    x_t = paths.interpolate(x, z, t)
    return (net(x_t, t, y) - paths.target_velocity(x, z)).pow(2).mean()


def train_2d(
    net: nn.Module,
    sample: Callable[..., Tensor],
    steps: int,
    batch: int = 1024,
    lr: float = 1e-3,
    **kwargs,
) -> TrainResult:
    """Flow matching on any 2-D ``sample(n, generator)`` or plain ``sample(n)`` callable."""
    sample = as_sampler(sample)
    return train(
        net,
        loss_fn=lambda m, x, g: loss(m, x, None, g),
        batch_fn=lambda g: sample(batch, generator=g),
        steps=steps,
        lr=lr,
        desc=kwargs.pop("desc", "flow matching (2-D)"),
        **kwargs,
    )


def train_images(
    net: nn.Module,
    data,
    steps: int,
    batch: int = 128,
    lr: float = 2e-4,
    conditional: bool = True,
    **kwargs,
) -> TrainResult:
    """Flow matching on an :class:`osdlib.data.ImageData` (class-conditional by default)."""
    return train(
        net,
        loss_fn=lambda m, b, g: loss(m, b[0], b[1] if conditional else None, g),
        batch_fn=lambda g: data.batch(batch, generator=g),
        steps=steps,
        lr=lr,
        desc=kwargs.pop("desc", f"flow matching ({data.name})"),
        **kwargs,
    )


def train_image_teacher(
    net: nn.Module, data, settings: dict, progress: bool = True
) -> tuple[nn.Module, dict]:
    """Train the chapter-00 image teacher from resolved settings; returns (EMA net, info)."""
    result = train_images(
        net,
        data,
        steps=settings["image_steps"],
        batch=settings["image_batch"],
        lr=settings["image_lr"],
        ema_decay=settings["ema_decay"],
        seed=settings["seed"],
        device=settings.get("device", "cpu"),
        warmup=min(1000, settings["image_steps"] // 10),
        progress=progress,
        ckpt_path=settings.get("ckpt_path"),
        ckpt_every=settings.get("ckpt_every", 0),
        max_seconds=settings.get("image_seconds"),
    )
    info = {
        "history": result.history,
        "train_wall_s": result.wall_s,
        "train_images_per_s": result.steps_per_s * settings["image_batch"],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
    }
    return result.ema, info
