"""The one convention of the book, and every conversion between parameterisations.

Flow time t in [0, 1] with the linear interpolant (flow matching = 1-rectified flow)

    x_t = (1 - t) x + t z,      x ~ data, z ~ N(0, I),   t = 0 data, t = 1 noise,

whose conditional velocity is dx_t/dt = z - x. Dividing by (1 - t) gives the EDM form
x_t / (1 - t) = x + sigma z with noise level

    sigma = t / (1 - t),        t = sigma / (1 + sigma),     scale s(t) = 1 - t.

A variance-preserving (DDPM) state x_vp = sqrt(abar) x + sqrt(1 - abar) z has the same
signal-to-noise ratio when sigma^2 = (1 - abar) / abar, i.e. abar = 1 / (1 + sigma^2);
then x_vp = sqrt(abar) / (1 - t) * x_t.

Given a velocity prediction v at (x_t, t), the model's estimates of the endpoints are
x0_hat = x_t - t v and z_hat = x_t + (1 - t) v, and the score of p_t is
grad log p_t(x_t) = -z_hat / t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _b(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample time (B,) or scalar against a batch ``like`` (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x + t z."""
    tb = _b(t, x)
    return (1 - tb) * x + tb * z


def target_velocity(x: Tensor, z: Tensor) -> Tensor:
    """The conditional velocity d x_t / dt = z - x (constant along the straight line)."""
    return z - x


def t_to_sigma(t: Tensor | float) -> Tensor:
    """EDM noise level sigma = t / (1 - t)."""
    t = torch.as_tensor(t)
    return t / (1 - t)


def sigma_to_t(sigma: Tensor | float) -> Tensor:
    """Flow time t = sigma / (1 + sigma)."""
    sigma = torch.as_tensor(sigma)
    return sigma / (1 + sigma)


def sigma_to_alpha_bar(sigma: Tensor | float) -> Tensor:
    """DDPM cumulative alpha with the same SNR: abar = 1 / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma)
    return 1 / (1 + sigma**2)


def alpha_bar_to_sigma(alpha_bar: Tensor | float) -> Tensor:
    """sigma = sqrt((1 - abar) / abar)."""
    a = torch.as_tensor(alpha_bar)
    return torch.sqrt((1 - a) / a)


def velocity_to_x0(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """x0_hat = x_t - t v."""
    return x_t - _b(t, x_t) * v


def velocity_to_eps(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """z_hat (epsilon) = x_t + (1 - t) v."""
    return x_t + (1 - _b(t, x_t)) * v


def velocity_to_score(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """grad log p_t(x_t) = -z_hat / t (undefined at t = 0)."""
    return -velocity_to_eps(v, x_t, t) / _b(t, x_t)


def x0_to_velocity(x0: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """v = (x_t - x0_hat) / t."""
    return (x_t - x0) / _b(t, x_t)


def eps_to_velocity(eps: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """v = (eps - x_t) / (1 - t), since x0_hat = (x_t - t eps) / (1 - t) and v = eps - x0_hat."""
    return (eps - x_t) / (1 - _b(t, x_t))


def score_to_velocity(score: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of :func:`velocity_to_score`: eps = -t * score, then :func:`eps_to_velocity`."""
    return eps_to_velocity(-_b(t, x_t) * score, x_t, t)


def edm_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """The EDM/Karras noise levels (descending, length n) — used by consistency models."""
    i = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / rho
    s = (sigma_max**inv + i / max(n - 1, 1) * (sigma_min**inv - sigma_max**inv)) ** rho
    return s.float()
