"""One training loop for every method of the book.

``train(model, loss_fn, batch_fn, steps, ...)`` does, per step::

    batch = batch_fn(data_generator)                 # any batch: tensors or tuples of them
    loss  = loss_fn(model, batch, noise_generator)   # a scalar (or (scalar, {name: value}))
    loss.backward(); clip; optimizer.step(); ema.update()

with EMA, gradient clipping, bf16 autocast on CUDA, tqdm progress, a metric history,
a NaN guard (it stops with the step number; the last good checkpoint is kept) and periodic
atomic checkpoints with exact resume: the random generators are part of the checkpoint, so
on the CPU a resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same call starts every rank from rank 0's
weights, averages the gradients over the ranks after each backward pass (what
DistributedDataParallel does, but for any ``loss_fn``: DDP only synchronises what runs through
its own forward, and the distillation losses call their model's parts, ``m.generator``), seeds
each rank's generators differently and lets rank 0 alone write checkpoints and show progress.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def show_progress(progress: bool = True) -> bool:
    """Whether to draw a progress bar: ``progress``, unless ``$OSD_PROGRESS`` is ``0`` (set by
    ``make reproduce`` and ``scripts/run_chapters.py``, so that executed notebooks stored in
    the book do not carry dozens of progress lines)."""
    return progress and os.environ.get("OSD_PROGRESS", "1") != "0"


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0
    steps: int = 0
    resumed_from: int = 0
    stopped_early: bool = False  # True when ``max_seconds`` ended the run before ``steps``

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
        # one fused call over all parameters: on a GPU a per-parameter loop launches hundreds
        # of tiny kernels per step
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


@contextmanager
def borrowed(module: nn.Module, device: str | torch.device):
    """Move a frozen helper (a teacher a loss calls) to ``device`` for the block, then put it
    back where it was: the counterpart of :func:`train` returning a model to its device."""
    home = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


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
        if torch.cuda.is_available():  # "cuda" means this rank's GPU from here on
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not torch.distributed.is_initialized():
            # NCCL for GPU tensors, gloo for CPU ones (a 2-D toy trains on the CPU)
            cuda = torch.cuda.is_available()
            torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        return torch.distributed.get_rank(), world
    return 0, 1


def _out_of_time(t0: float, max_seconds: float, world: int) -> bool:
    """Whether the wall-clock cap is reached; under torchrun every rank takes rank 0's
    answer, so that all ranks stop at the same step."""
    late = time.perf_counter() - t0 >= max_seconds
    if world > 1:
        flag = torch.tensor([float(late)], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.broadcast(flag, src=0)
        late = bool(flag.item())
    return late


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of all gradients,
    one of the flags below). A parameter without a gradient on this rank counts as zero; one
    that no rank touched keeps none (so the optimiser leaves it alone, as on one device)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    touched = torch.tensor([float(p.grad is not None) for p in params], device=flat.device)
    torch.distributed.all_reduce(flat)
    torch.distributed.all_reduce(touched)
    flat /= world
    for p, part, n in zip(params, flat.split([p.numel() for p in params]), touched.tolist()):
        p.grad = part.view_as(p).to(p.dtype) if n > 0 else None


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
    max_seconds: float | None = None,
    amp: bool = True,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps (see the module docstring).

    ``batch_fn(generator)`` returns the next batch; ``loss_fn(model, batch, generator)``
    returns the loss, optionally with a dict of extra scalars to log. A ``loss_fn`` with a
    fourth parameter ``step`` also receives the step number (for schedules). With ``ckpt_path``
    set, a checkpoint is written every ``ckpt_every`` steps and at the end, and an existing
    one is resumed from when ``resume`` is true.

    The model is trained on ``device`` and returned (with its EMA) on the device it was on
    when passed in. ``max_seconds`` is a wall-clock cap: training stops after the step during which it is
    reached, and ``TrainResult.steps`` says how many steps ran (``stopped_early`` is set).
    The ``gpu`` profile uses it so that a chapter keeps to its time budget on any GPU; the
    schedules of a method still refer to the planned ``steps`` (except SlimFlow's annealing,
    which ends by the cap: :func:`~osdlib.methods.rectified_flow.train_annealing_reflow`).
    ``amp=False`` turns off
    bf16 autocast on CUDA (small 2-D models want full precision and gain nothing from it).
    """
    import inspect
    import sys

    from tqdm import tqdm

    wants_step = "step" in inspect.signature(loss_fn).parameters

    device = torch.device(device)
    home = next(iter(model.parameters()), torch.empty(0)).device  # where the model came from
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
        if world > 1:  # the checkpoint holds rank 0's generators: each rank goes on with its own
            data_gen.manual_seed((seed * 1000 + rank) * 1_000_003 + start)
            noise_gen.manual_seed((seed * 1000 + rank + 1) * 1_000_003 + start)

    if world > 1:  # every rank starts from rank 0's model
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
    params = [p for p in model.parameters() if p.requires_grad]
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
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and amp
        else nullcontext()
    )
    model.train()
    running: dict[str, float] = {}
    counts: dict[str, int] = {}  # per key: a loss_fn may report some values only on some steps
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps),
        desc=desc,
        disable=not show_progress(progress) or rank != 0,
        initial=start,
        total=steps,
        mininterval=1.0 if sys.stderr.isatty() else 5.0,  # few stored lines in notebooks
    )
    stopped_early = False
    for step in bar:
        if max_seconds is not None and step > start and _out_of_time(t0, max_seconds, world):
            stopped_early = True
            steps = step  # the checkpoint and the result say how far it got
            if counts:  # keep the partly filled logging interval
                history["step"].append(step)
                for k, v in running.items():
                    history.setdefault(k, []).append(v / counts[k])
            bar.set_postfix_str(f"stopped by the {max_seconds:.0f} s cap", refresh=False)
            break
        if warmup:
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * min(1.0, (step + 1) / warmup)
        batch = to_device(batch_fn(data_gen), device)
        with autocast:
            out = (
                loss_fn(model, batch, noise_gen, step)
                if wants_step
                else loss_fn(model, batch, noise_gen)
            )
        loss, extra = out if isinstance(out, tuple) else (out, {})
        value = loss.detach().clone()
        if world > 1:  # the mean over the ranks: a NaN on one rank stops them all
            torch.distributed.all_reduce(value)
            value /= world
        value = value.item()
        if not math.isfinite(value):
            where = f"; the last good checkpoint is kept at {ckpt_path}" if ckpt_path else ""
            raise FloatingPointError(f"loss became {value} at step {step}{where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(params, world)
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
    bar.close()
    wall = time.perf_counter() - t0
    checkpoint(steps)
    model.eval()
    # the model (and its EMA) go back to the device they came from: ``device`` is where the
    # work is done, so a small CPU model trained on a GPU is evaluated on the CPU as before
    model.to(home)
    ema.module.to(home)
    return TrainResult(model, ema.module, history, wall, steps, start, stopped_early)
