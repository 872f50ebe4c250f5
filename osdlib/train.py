"""One training loop for every method of the book.

``train(model, loss_fn, batch_fn, steps, ...)`` does, per step::

    batch = batch_fn(data_generator)                 # any batch: tensors or tuples of them
    loss  = loss_fn(model, batch, noise_generator)   # a scalar (or (scalar, {name: value}))
    loss.backward(); clip; optimizer.step(); ema.update()

with EMA, gradient clipping, bf16 autocast on CUDA, tqdm progress, a metric history,
a NaN guard (it stops with the step number; the last good checkpoint is kept) and periodic
atomic checkpoints with exact resume: the random generators are part of the checkpoint, so
on the CPU a resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same call wraps the model in
DistributedDataParallel, seeds each rank's generators differently and lets rank 0 alone
write checkpoints and show progress.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0
    steps: int = 0
    resumed_from: int = 0

    @property
    def steps_per_s(self) -> float:
        done = self.steps - self.resumed_from
        return done / self.wall_s if self.wall_s > 0 else float("nan")


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    The decay warms up as min(decay, (1 + step) / (10 + step)), so that short runs are not
    dominated by the initial weights (with a fixed 0.999, 22% of the average would still be
    the random initialisation after 1,500 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor, or a tuple/list/dict of tensors, to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(module: nn.Module, path: str | Path) -> None:
    """Write a module's weights as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load weights written by :func:`save_weights` into ``module`` (in place); returns it."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))
    return module


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`train` (``weights_only=True``: no pickled code)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.distributed.is_available():
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        return torch.distributed.get_rank(), world
    return 0, 1


def train(
    model: nn.Module,
    loss_fn: Callable[..., Tensor | tuple[Tensor, dict[str, float]]],
    batch_fn: Callable[[torch.Generator], Any],
    steps: int,
    *,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    warmup: int = 0,
    ema_decay: float = 0.999,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    ckpt_path: str | Path | None = None,
    ckpt_every: int = 0,
    resume: bool = True,
    log_every: int = 50,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps (see the module docstring).

    ``batch_fn(generator)`` returns the next batch; ``loss_fn(model, batch, generator)``
    returns the loss, optionally with a dict of extra scalars to log. A ``loss_fn`` with a
    fourth parameter ``step`` also receives the step number (for schedules). With ``ckpt_path``
    set, a checkpoint is written every ``ckpt_every`` steps and at the end, and an existing
    one is resumed from when ``resume`` is true.
    """
    import inspect
    import sys

    from tqdm import tqdm

    wants_step = "step" in inspect.signature(loss_fn).parameters

    device = torch.device(device)
    rank, world = _dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model = model.to(device)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    data_gen = torch.Generator().manual_seed(seed * 1000 + rank)
    noise_gen = torch.Generator(device).manual_seed(seed * 1000 + rank + 1)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    start = 0
    state = None
    if ckpt_path is not None and resume and Path(ckpt_path).exists():
        state = load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"].cpu())
        noise_gen.set_state(state["noise_gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        history = {k: list(v) for k, v in state["history"].items()}
        start = int(state["step"])

    wrapped = model
    if world > 1:  # DDP broadcasts rank 0's weights, so every rank starts from the same model
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    ema = EMA(model, ema_decay)
    if state is not None:
        ema.module.load_state_dict(state["ema"])

    def checkpoint(step: int) -> None:
        if ckpt_path is None or rank != 0:
            return
        save_atomic(
            {
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "history": history,
                "data_gen": data_gen.get_state(),
                "noise_gen": noise_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_path,
        )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    model.train()
    running: dict[str, float] = {}
    counts: dict[str, int] = {}  # per key: a loss_fn may report some values only on some steps
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps),
        desc=desc,
        disable=not progress or rank != 0,
        initial=start,
        total=steps,
        mininterval=1.0 if sys.stderr.isatty() else 5.0,  # few stored lines in notebooks
    )
    for step in bar:
        if warmup:
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * min(1.0, (step + 1) / warmup)
        batch = to_device(batch_fn(data_gen), device)
        with autocast:
            out = (
                loss_fn(wrapped, batch, noise_gen, step)
                if wants_step
                else loss_fn(wrapped, batch, noise_gen)
            )
        loss, extra = out if isinstance(out, tuple) else (out, {})
        value = loss.item()
        if not math.isfinite(value):
            where = f"; the last good checkpoint is kept at {ckpt_path}" if ckpt_path else ""
            raise FloatingPointError(f"loss became {value} at step {step}{where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model, step)
        for k, v in {"loss": value, **{k: float(v) for k, v in extra.items()}}.items():
            running[k] = running.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        done = step + 1
        if done % log_every == 0 or done == steps:
            history["step"].append(done)
            for k, v in running.items():
                history.setdefault(k, []).append(v / counts[k])
            bar.set_postfix(loss=f"{running['loss'] / counts['loss']:.4f}", refresh=False)
            running, counts = {}, {}
        if ckpt_every and done % ckpt_every == 0 and done != steps:
            checkpoint(done)
    wall = time.perf_counter() - t0
    checkpoint(steps)
    model.eval()
    return TrainResult(model, ema.module, history, wall, steps, start)
