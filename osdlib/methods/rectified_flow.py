"""Rectified flow: reflow, k-step distillation and SlimFlow (chapter 01).

Convention (see :mod:`osdlib.paths`): x_t = (1 - t) x + t z, t = 0 data, t = 1 noise; a
velocity net v(x_t, t, y) is integrated from t = 1 to 0.

* **Coupling.** Integrate a teacher's ODE from noise z to x = T(z) and store the pairs
  (:func:`generate_pairs`, kept on disk as memory-mapped arrays by :class:`PairSet`).
* **Reflow.** Flow matching on the *coupled* pairs: the same loss as
  :func:`osdlib.methods.flow_matching.loss` with the pair's own z instead of fresh noise.
  The new flow's paths cross less, so they are straighter (2-rectified flow).
* **Distillation.** Fit a k-step student on the coupling: at the grid times
  t in {1/k, ..., 1} the student's endpoint estimate x_t - t v(x_t, t) should hit the
  pair's x (distance ``l2``, ``pseudo_huber`` or ``lpips``). k = 1 is the one-step
  generator G(z) = z - v(z, 1).
* **SlimFlow.** A smaller student: *annealing reflow* trains it from scratch on pairs whose
  noise end is sqrt(1 - b^2) z + b e (b from 1 to 0), then *flow-guided distillation* adds,
  to the one-step distillation loss, an online 2-step target: the student's own (detached)
  guess moved to an intermediate time s, then one Euler step of the big 2-RF teacher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import paths
from ..losses import Distance, distance
from ..train import TrainResult, borrowed, train
from . import flow_matching


class PairSet:
    """A coupling (z, x[, y]) on disk as ``.npy`` memory maps, so it never needs to fit in
    memory; :meth:`batch` draws random rows (a reshuffle every batch)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.z = np.load(self.path / "z.npy", mmap_mode="r")
        self.x = np.load(self.path / "x.npy", mmap_mode="r")
        self.y = np.load(self.path / "y.npy", mmap_mode="r") if meta["labels"] else None

    def __len__(self) -> int:
        return len(self.z)

    def batch(self, n: int, generator: torch.Generator | None = None):
        """``(x, z, y)`` float32 tensors for ``n`` random pairs (``y`` None if unlabelled)."""
        idx = np.sort(torch.randint(0, len(self), (n,), generator=generator).numpy())
        x = torch.from_numpy(np.asarray(self.x[idx], dtype=np.float32))
        z = torch.from_numpy(np.asarray(self.z[idx], dtype=np.float32))
        y = torch.from_numpy(np.asarray(self.y[idx])).long() if self.y is not None else None
        return x, z, y


@torch.no_grad()
def generate_pairs(
    teacher,
    n: int,
    path: str | Path,
    steps: int = 100,
    solver: str = "euler",
    num_classes: int | None = None,
    batch: int = 1000,
    fp16: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PairSet:
    """Integrate ``teacher`` (a :class:`~osdlib.teachers.Teacher`) from ``n`` noise draws and
    write the coupling to ``path`` batch by batch (``fp16`` halves the disk space).

    Class labels, when ``num_classes`` is given, are balanced (i mod num_classes).
    """
    from tqdm import tqdm

    from ..train import show_progress

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = tuple(teacher.shape)
    dtype = np.float16 if fp16 else np.float32
    z_mm = np.lib.format.open_memmap(path / "z.npy", "w+", dtype, (n, *shape))
    x_mm = np.lib.format.open_memmap(path / "x.npy", "w+", dtype, (n, *shape))
    labels = torch.arange(n) % num_classes if num_classes else None
    if labels is not None:
        np.save(path / "y.npy", labels.numpy().astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    for i in tqdm(
        range(0, n, batch), desc="teacher pairs", disable=not show_progress(progress), mininterval=5
    ):
        m = min(batch, n - i)
        z = torch.randn(m, *shape, generator=g)
        y = labels[i : i + m].to(device) if labels is not None else None
        x = teacher.sample(m, steps=steps, solver=solver, y=y, z=z).x
        z_mm[i : i + m] = z.numpy().astype(dtype)
        x_mm[i : i + m] = x.float().cpu().numpy().astype(dtype)
    z_mm.flush()
    x_mm.flush()
    del z_mm, x_mm
    meta = {
        "n": n,
        "shape": list(shape),
        "steps": steps,
        "solver": solver,
        "fp16": fp16,
        "labels": labels is not None,
        "t_max": float(teacher.t_max),
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return PairSet(path)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def reflow_loss(
    net: nn.Module,
    x: Tensor,
    z: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reflow: flow matching on coupled pairs (x = T(z)) — the chapter-00 loss with the
    pair's own noise."""
    return flow_matching.loss(net, x, y, generator, z=z)


def grid_times(
    k: int, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
) -> Tensor:
    """``n`` times drawn uniformly from the k-step Euler grid {1/k, 2/k, ..., 1}."""
    i = torch.randint(1, k + 1, (n,), generator=generator, device=device)
    return i.float() / k


def distill_loss(
    net: nn.Module,
    x: Tensor,
    z: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    k: int = 1,
    dist: Distance | None = None,
) -> Tensor:
    """k-step distillation on a coupling: at t on the k-step grid, the endpoint estimate
    x_t - t v(x_t, t) must match the pair's x (per-sample ``dist``, L2 by default)."""
    from ..losses import l2

    dist = dist or l2
    t = grid_times(k, len(x), generator, x.device).to(x.dtype)
    x_t = paths.interpolate(x, z, t)
    x0_hat = paths.velocity_to_x0(net(x_t, t, y), x_t, t)
    return dist(x0_hat, x).mean()


def one_step(net: nn.Module, z: Tensor, y: Tensor | None = None, t_max: float = 1.0) -> Tensor:
    """The one-step generator G(z) = z - v(z, 1) of a (distilled) flow."""
    t = torch.full((len(z),), t_max, device=z.device, dtype=z.dtype)
    return paths.velocity_to_x0(net(z, t, y), z, t)


def annealed_noise(z: Tensor, b: float, generator: torch.Generator | None = None) -> Tensor:
    """SlimFlow's annealing: sqrt(1 - b^2) z + b e, e fresh noise (b = 1: unpaired)."""
    e = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return (1 - b**2) ** 0.5 * z + b * e


def flow_guided_loss(
    student: nn.Module,
    teacher: nn.Module,
    z: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    dist: Distance | None = None,
    s_range: tuple[float, float] = (0.2, 0.8),
) -> Tensor:
    """SlimFlow's flow guidance: the student's one-step output G(z) must match a 2-step
    target: its own detached guess moved to a random time s, x_s = s z + (1 - s) G(z), then
    one Euler step of the teacher flow from s to 0, x_s - s v_T(x_s, s)."""
    from ..losses import l2

    dist = dist or l2
    pred = one_step(student, z, y)
    with torch.no_grad():
        s = torch.rand(len(z), generator=generator, device=z.device, dtype=z.dtype)
        s = s_range[0] + (s_range[1] - s_range[0]) * s
        x_s = paths.interpolate(pred.detach(), z, s)
        target = paths.velocity_to_x0(teacher(x_s, s, y), x_s, s)
    return dist(pred, target).mean()


# --------------------------------------------------------------------------------------
# Training wrappers (data = anything with .batch(n, generator) -> (x, z, y))
# --------------------------------------------------------------------------------------


def train_reflow(net: nn.Module, pairs, steps: int, batch: int = 256, **kwargs) -> TrainResult:
    """Train a (k+1)-rectified flow on a coupling; initialise ``net`` from the k-RF first."""
    return train(
        net,
        loss_fn=lambda m, b, g: reflow_loss(m, b[0], b[1], b[2], g),
        batch_fn=lambda g: pairs.batch(batch, g),
        steps=steps,
        desc=kwargs.pop("desc", "reflow"),
        **kwargs,
    )


def train_distill(
    net: nn.Module, pairs, steps: int, k: int = 1, batch: int = 256, dist: str = "l2", **kwargs
) -> TrainResult:
    """Distil a k-step student on a coupling (initialise ``net`` from the reflowed flow)."""
    d = distance(dist)
    return train(
        net,
        loss_fn=lambda m, b, g: distill_loss(m, b[0], b[1], b[2], g, k=k, dist=d),
        batch_fn=lambda g: pairs.batch(batch, g),
        steps=steps,
        desc=kwargs.pop("desc", f"distill k={k} ({dist})"),
        **kwargs,
    )


def train_annealing_reflow(
    net: nn.Module, pairs, steps: int, batch: int = 256, anneal_steps: int | None = None, **kwargs
) -> TrainResult:
    """SlimFlow stage 1: reflow from scratch with b annealed linearly from 1 to 0 over
    ``anneal_steps`` (default ``steps``). Under a wall-clock cap (``max_seconds``) b follows
    whichever is further along, the steps or the time since this call, so that the annealing
    ends by the cap (a cap usually stops training long before the planned steps). A run
    resumed from a checkpoint counts its time from the resumption."""
    anneal = anneal_steps or steps
    cap = kwargs.get("max_seconds")
    start = time.perf_counter()

    def loss_fn(m, b, g, step):
        x, z, y = b
        done = step / anneal
        if cap:
            done = max(done, (time.perf_counter() - start) / cap)
        return reflow_loss(m, x, annealed_noise(z, max(0.0, 1 - done), g), y, g)

    return train(
        net,
        loss_fn,
        lambda g: pairs.batch(batch, g),
        steps,
        desc=kwargs.pop("desc", "annealing reflow"),
        **kwargs,
    )


def train_flow_guided(
    net: nn.Module,
    teacher: nn.Module,
    pairs,
    steps: int,
    batch: int = 256,
    dist: str = "l2",
    guide_weight: float = 1.0,
    **kwargs,
) -> TrainResult:
    """SlimFlow stage 2: one-step distillation on the coupling plus flow guidance from the
    (frozen) 2-RF ``teacher`` on fresh noise."""
    d = distance(dist)
    teacher = teacher.eval().requires_grad_(False)

    def loss_fn(m, b, g):
        x, z, y = b
        fresh = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
        main = distill_loss(m, x, z, y, g, k=1, dist=d)
        guide = flow_guided_loss(m, teacher, fresh, y, g, d)
        return main + guide_weight * guide, {"distill": main.item(), "guide": guide.item()}

    with borrowed(teacher, kwargs.get("device", "cpu")):  # it runs where the training runs
        return train(
            net,
            loss_fn,
            lambda g: pairs.batch(batch, g),
            steps,
            desc=kwargs.pop("desc", "flow-guided distillation"),
            **kwargs,
        )


__all__ = [
    "PairSet",
    "generate_pairs",
    "reflow_loss",
    "grid_times",
    "distill_loss",
    "one_step",
    "annealed_noise",
    "flow_guided_loss",
    "train_reflow",
    "train_distill",
    "train_annealing_reflow",
    "train_flow_guided",
]
