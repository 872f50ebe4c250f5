"""Distilled decoding (DD, Liu et al. 2025): a deterministic map from Gaussian noise to the
tokens of an autoregressive (AR) model — chapter 06.

At one position the AR model gives a categorical distribution p over K codebook vectors
c_1..c_K in R^D (after temperature / top-k). That is a mixture of point masses, and flow
matching from a Gaussian noise token eps ~ N(0, I_D) to it has a closed-form velocity.
Along the interpolant x_t = (1 - t) eps + t c (t = 0: noise, t = 1: a code),

    v(x, t) = (E[c | x_t = x] - x) / (1 - t),
    E[c | x_t = x] = sum_k w_k c_k,  w_k  ∝  p_k N(x; t c_k, (1 - t)^2 I),

the posterior mean of the code given the current point. Integrating dx/dt = v from t = 0
to 1 carries N(0, I) to the mixture: the map eps -> code is deterministic and, with exact
integration, hits code k with probability p_k. With Euler steps the last step lands on the
posterior mean at t = 1 - dt, whose code is read off as the most probable one; few steps
bias the frequencies (:func:`map_tokens`' tests measure both).

Applied position by position (the chosen code is fed back to the AR model as its next
token), a sequence of noise tokens maps to a token sequence distributed as the AR model's
samples. DD trains a student to apply this whole map in one forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor


def posterior_logits(x: Tensor, t: float | Tensor, logp: Tensor, codes: Tensor) -> Tensor:
    """log w_k (unnormalised) = log p_k - ||x - t c_k||^2 / (2 (1 - t)^2), shape (N, K).

    ``x`` (N, D); ``logp`` (N, K) log-probabilities; ``codes`` (K, D) or (N, K, D)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
    if codes.dim() == 2:
        codes = codes.unsqueeze(0)
    sq = ((x.unsqueeze(1) - t.unsqueeze(-1) * codes) ** 2).sum(-1)
    return logp - sq / (2 * (1 - t) ** 2)


def velocity(x: Tensor, t: float | Tensor, logp: Tensor, codes: Tensor) -> Tensor:
    """The flow-matching velocity (E[c | x_t = x] - x) / (1 - t) toward the mixture."""
    w = torch.softmax(posterior_logits(x, t, logp, codes), dim=-1)
    mean = torch.einsum(
        "nk,nkd->nd", w, codes if codes.dim() == 3 else codes.expand(len(x), -1, -1)
    )
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
    return (mean - x) / (1 - t)


def map_tokens(eps: Tensor, logp: Tensor, codes: Tensor, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Integrate noise tokens ``eps`` (N, D) to codes with ``steps`` Euler steps on a uniform
    grid; returns (code indices (N,), end points (N, D)). Deterministic in ``eps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = eps.double()
    logp, codes = logp.double(), codes.double()
    dt = 1.0 / steps
    for i in range(steps):
        t = i * dt
        if i == steps - 1:  # the last step lands on the posterior mean; read its code
            index = posterior_logits(x, t, logp, codes).argmax(-1)
        x = x + dt * velocity(x, t, logp, codes)
    return index, x.to(eps.dtype)


def process_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Log-probabilities after temperature and top-k (the AR sampler's own processing)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1)
