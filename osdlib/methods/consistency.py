"""Consistency models: distillation (CD), training (CT, iCT) and tuning (ECT) — chapter 02.

Convention: the EDM noise level sigma, x_sigma = x + sigma z (:mod:`osdlib.paths`:
x_sigma = x_t / (1 - t), sigma = t / (1 - t)). A consistency function maps any point of an
ODE path to the path's end: f(x_sigma, sigma) = x for all sigma, with f(x, sigma_min) = x.

Two parameterisations of f share every loss and sampler here:

* :class:`ConsistencyModel` — the one of Song et al. / iCT,
  f = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, sigma), with
  c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),
  c_out = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2),
  c_in = 1 / sqrt(sigma^2 + sigma_d^2) — so f(x, sigma_min) = x exactly.
* :class:`FlowConsistency` — a flow velocity net read as a denoiser,
  f = x_t - t v(x_t, t) with t = sigma / (1 + sigma), x_t = (1 - t) x_sigma. At sigma = 0 it
  is the identity, and a chapter-00 teacher is a valid starting point (ECT).

iCT (Song & Dhariwal 2023): Karras noise levels with N(k) points, N(k) = min(s0 2^floor(k/K'),
s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)); adjacent pairs (sigma_i, sigma_{i+1})
drawn from a discretised lognormal (P_mean, P_std); weight 1 / (sigma_{i+1} - sigma_i);
pseudo-Huber distance on the whole sample vector with c = 0.00054 sqrt(d); the teacher is
the student itself with gradients stopped (no EMA teacher), under the same dropout mask.

ECT (Geng et al. 2024): start from a pretrained diffusion model; draw sigma from the
lognormal and r = sigma (1 - q^-(stage+1) (1 + k sigmoid(-b sigma))), clamped at 0, so the
gap sigma - r shrinks stage by stage; the target at r = 0 is the data point itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import paths
from ..losses import Distance, pseudo_huber
from ..train import TrainResult, train

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


def _b(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def scalings(sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) of the consistency parameterisation (note the square root in c_in)."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


class ConsistencyModel(nn.Module):
    """f(x, sigma, y) = c_skip x + c_out F(c_in x, t(sigma), y) for a ``net(x, t, y)``."""

    def __init__(
        self, net: nn.Module, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA
    ) -> None:
        super().__init__()
        self.net, self.sigma_min, self.sigma_data = net, sigma_min, sigma_data

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = sigma.reshape(-1).expand(len(x)).to(x)
        c_skip, c_out, c_in = (_b(c, x) for c in scalings(sigma, self.sigma_min, self.sigma_data))
        return c_skip * x + c_out * self.net(c_in * x, paths.sigma_to_t(sigma), y)


class FlowConsistency(nn.Module):
    """f(x_sigma, sigma, y) = x0 estimate of a flow velocity net (identity at sigma = 0)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = sigma.reshape(-1).expand(len(x)).to(x)
        t = paths.sigma_to_t(sigma)
        x_t = (1 - _b(t, x)) * x
        return paths.velocity_to_x0(self.net(x_t, t, y), x_t, t)


# --------------------------------------------------------------------------------------
# iCT's noise schedule
# --------------------------------------------------------------------------------------


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """The n Karras noise levels in increasing order, sigma_1 = sigma_min ... sigma_n = sigma_max."""
    return paths.edm_sigmas(n, sigma_min, sigma_max, rho).flip(0)


def curriculum(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation N(k) = min(s0 2^floor(k / K'), s1) + 1,
    K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(k_prime, 1)), s1) + 1


def lognormal_weights(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Probabilities of the adjacent pairs (sigma_i, sigma_{i+1}) under a discretised
    lognormal: erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_i - ...))."""
    cdf = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2) * p_std))
    w = cdf[1:] - cdf[:-1]
    return (w / w.sum()).float()


def sample_pairs(
    n: int,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """``n`` adjacent noise-level pairs (sigma_i, sigma_{i+1}) from the discretised lognormal."""
    i = torch.multinomial(
        lognormal_weights(sigmas, p_mean, p_std), n, replacement=True, generator=generator
    )
    return sigmas[i], sigmas[i + 1]


@contextmanager
def same_dropout():
    """Run the second forward pass with the random state of the first (CPU and CUDA), so both
    see the same dropout mask: ``with same_dropout() as again: a = f(...); again(); b = f(...)``."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def again() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    yield again


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def consistency_loss(
    f: nn.Module,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    teacher_step=None,
    dist: Distance = pseudo_huber,
    weight: Tensor | None = None,
) -> Tensor:
    """d(f(x + sigma_next z, sigma_next), stopgrad f(x_prev, sigma)) weighted per sample.

    Consistency training: x_prev = x + sigma z (the data point stands in for the ODE).
    Consistency distillation: ``teacher_step(x_next, sigma_next, sigma, y)`` returns x_prev,
    one ODE step of a teacher. The stop-gradient target uses the same dropout mask.
    """
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_next = x + _b(sigma_next, x) * z
    with same_dropout() as again:
        pred = f(x_next, sigma_next, y)
        again()
        with torch.no_grad():
            x_prev = (
                (x + _b(sigma, x) * z)
                if teacher_step is None
                else teacher_step(x_next, sigma_next, sigma, y)
            )
            target = f(x_prev, sigma, y)
    w = (1 / (sigma_next - sigma)) if weight is None else weight
    return (w * dist(pred, target)).mean()


def euler_teacher_step(denoiser):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""

    @torch.no_grad()
    def step(x: Tensor, sigma_from: Tensor, sigma_to: Tensor, y: Tensor | None = None) -> Tensor:
        d = (x - denoiser(x, sigma_from, y)) / _b(sigma_from, x)
        return x + _b(sigma_to - sigma_from, x) * d

    return step


def ect_r(sigma: Tensor, stage: int, q: float = 4.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping to the smaller noise level r(sigma) = sigma (1 - q^-(stage+1) (1 + k sigmoid(-b sigma))), >= 0."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * sigma))
    return (sigma * ratio).clamp_min(0)


def ect_loss(
    f: nn.Module,
    x: Tensor,
    y: Tensor | None,
    generator: torch.Generator | None,
    stage: int,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    q: float = 4.0,
    sigma_data: float = SIGMA_DATA,
) -> Tensor:
    """ECT: continuous sigma ~ lognormal, r = :func:`ect_r`, target f(x + r z, r) (x itself
    at r = 0) under the same dropout mask, weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
    distance sqrt(||.||^2) (pseudo-Huber with c = 0)."""
    n = torch.randn(len(x), generator=generator, device=x.device, dtype=x.dtype)
    sigma = torch.exp(p_mean + p_std * n)
    r = ect_r(sigma, stage, q)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    with same_dropout() as again:
        pred = f(x + _b(sigma, x) * z, sigma, y)
        again()
        with torch.no_grad():
            target = f(x + _b(r, x) * z, r, y)
            target = torch.where(_b(r, x) > 0, target, x)
    w = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (w * pseudo_huber(pred, target, c=1e-8)).mean()  # c ~ 0: the plain L2 norm


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    f: nn.Module,
    z: Tensor,
    sigmas: tuple[float, ...] = (SIGMA_MAX,),
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One step x = f(sigma_max z, sigma_max), then for each further sigma re-noise
    x + sigma e (e fresh noise) and apply f again (multistep consistency sampling)."""
    x = f(sigmas[0] * z, torch.full((len(z),), sigmas[0], device=z.device), y)
    for s in sigmas[1:]:
        e = torch.randn(z.shape, generator=generator).to(z)
        x = f(x + s * e, torch.full((len(z),), s, device=z.device), y)
    return x


# --------------------------------------------------------------------------------------
# Training wrappers (data: batch_fn(generator) -> (x, y) or x)
# --------------------------------------------------------------------------------------


def _xy(batch):
    return batch if isinstance(batch, (tuple, list)) else (batch, None)


def train_ict(
    f: nn.Module,
    batch_fn,
    steps: int,
    s0: int = 10,
    s1: int = 1280,
    dist: Distance = pseudo_huber,
    teacher_step=None,
    **kwargs,
) -> TrainResult:
    """iCT (or CD with ``teacher_step``) with the N(k) curriculum over ``steps`` iterations."""

    def loss_fn(m, batch, g, step):
        x, y = _xy(batch)
        sigmas = karras_sigmas(curriculum(step, steps, s0, s1)).to(x.device)
        gen = g if g.device.type == "cpu" else None
        s, s_next = sample_pairs(len(x), sigmas.cpu(), gen)
        return consistency_loss(m, x, s.to(x), s_next.to(x), y, g, teacher_step, dist)

    return train(f, loss_fn, batch_fn, steps, desc=kwargs.pop("desc", "iCT"), **kwargs)


def train_ect(
    f: nn.Module, batch_fn, steps: int, stages: int = 4, q: float = 4.0, **kwargs
) -> TrainResult:
    """ECT from an initialised ``f``: ``stages`` equal stages, the gap shrinking by q each."""
    per_stage = max(1, steps // stages)

    def loss_fn(m, batch, g, step):
        x, y = _xy(batch)
        return ect_loss(m, x, y, g, min(step // per_stage, stages - 1), q=q)

    return train(f, loss_fn, batch_fn, steps, desc=kwargs.pop("desc", "ECT"), **kwargs)
