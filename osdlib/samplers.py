"""ODE samplers for the flow convention of :mod:`osdlib.paths` (integrate t from 1 to 0).

Each sampler takes ``velocity(x, t, y)``, a starting point at the first time of ``ts`` and
a decreasing time grid, and returns the end point and the number of function evaluations
(NFE) it spent. Trajectories can be kept for pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class SampleResult:
    x: Tensor
    nfe: int
    trajectory: list[Tensor] = field(default_factory=list)


def uniform_times(steps: int, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """``steps + 1`` equally spaced times from ``t_max`` down to ``t_min``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t_max, t_min, steps + 1)


def _tvec(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.device, x.dtype).expand(len(x))


@torch.no_grad()
def euler(
    velocity: Velocity,
    x: Tensor,
    ts: Tensor,
    y: Tensor | None = None,
    keep_trajectory: bool = False,
) -> SampleResult:
    """Euler: x <- x + (t_next - t) v(x, t). One NFE per step."""
    traj = [x.cpu()] if keep_trajectory else []
    nfe = 0
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t).item() * velocity(x, _tvec(t, x), y)
        nfe += 1
        if keep_trajectory:
            traj.append(x.cpu())
    return SampleResult(x, nfe, traj)


@torch.no_grad()
def heun(
    velocity: Velocity,
    x: Tensor,
    ts: Tensor,
    y: Tensor | None = None,
    keep_trajectory: bool = False,
) -> SampleResult:
    """Heun (2nd order): Euler predictor, trapezoidal corrector. Two NFE per step.

    Unlike EDM, whose denoiser is undefined at sigma = 0, a flow velocity is defined at
    t = 0, so the corrector is applied on the last step too."""
    traj = [x.cpu()] if keep_trajectory else []
    nfe = 0
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = (t_next - t).item()
        v = velocity(x, _tvec(t, x), y)
        v_next = velocity(x + dt * v, _tvec(t_next, x), y)
        x = x + dt * 0.5 * (v + v_next)
        nfe += 2
        if keep_trajectory:
            traj.append(x.cpu())
    return SampleResult(x, nfe, traj)


SOLVERS = {"euler": euler, "heun": heun}


def solve(
    velocity: Velocity,
    x: Tensor,
    steps: int,
    solver: str = "euler",
    y: Tensor | None = None,
    t_max: float = 1.0,
    t_min: float = 0.0,
    keep_trajectory: bool = False,
) -> SampleResult:
    """Integrate from ``t_max`` to ``t_min`` in ``steps`` uniform steps with a named solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers are: {', '.join(SOLVERS)}")
    ts = uniform_times(steps, t_max, t_min)
    return SOLVERS[solver](velocity, x, ts, y, keep_trajectory)


@torch.no_grad()
def in_chunks(
    fn: Callable[[Tensor, Tensor | None], Tensor],
    z: Tensor,
    y: Tensor | None = None,
    device: str | torch.device = "cpu",
    chunk: int = 1000,
) -> Tensor:
    """Generate from noise ``z`` (and labels ``y``) chunk by chunk on ``device``:
    ``fn(z_chunk, y_chunk) -> samples``; returns all samples on the CPU."""
    out = []
    for i in range(0, len(z), chunk):
        yy = None if y is None else y[i : i + chunk].to(device)
        out.append(fn(z[i : i + chunk].to(device), yy).float().cpu())
    return torch.cat(out)
