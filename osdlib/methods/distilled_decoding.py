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
import torch.nn.functional as F
from torch import Tensor, nn


def _column(t: float | Tensor, x: Tensor) -> float | Tensor:
    """A time as a column (N, 1) on ``x``'s device; a Python number stays one (no copy to
    the GPU and no wait for it, 2 x steps x tokens times per sequence)."""
    return float(t) if not torch.is_tensor(t) else t.to(x).reshape(-1, 1)


def posterior_logits(x: Tensor, t: float | Tensor, logp: Tensor, codes: Tensor) -> Tensor:
    """log w_k (unnormalised) = log p_k - ||x - t c_k||^2 / (2 (1 - t)^2), shape (N, K).

    ``x`` (N, D); ``logp`` (N, K) log-probabilities; ``codes`` (K, D) or (N, K, D)."""
    t = _column(t, x)
    if codes.dim() == 2:
        codes = codes.unsqueeze(0)
    tc = t * codes if isinstance(t, float) else t.unsqueeze(-1) * codes
    sq = ((x.unsqueeze(1) - tc) ** 2).sum(-1)
    return logp - sq / (2 * (1 - t) ** 2)


def velocity(x: Tensor, t: float | Tensor, logp: Tensor, codes: Tensor) -> Tensor:
    """The flow-matching velocity (E[c | x_t = x] - x) / (1 - t) toward the mixture."""
    w = torch.softmax(posterior_logits(x, t, logp, codes), dim=-1)
    mean = torch.einsum(
        "nk,nkd->nd", w, codes if codes.dim() == 3 else codes.expand(len(x), -1, -1)
    )
    return (mean - x) / (1 - _column(t, x))


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


def map_sequence(
    ar,
    y: Tensor,
    eps: Tensor,
    codes: Tensor,
    steps: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """DD's map for a whole sequence: noise tokens ``eps`` (B, L, D) -> tokens (B, L).

    Position by position, the AR model's processed distribution and the code vectors define
    the flow of :func:`map_tokens`; the code it reaches is fed back as the next token."""

    def choose(logits: Tensor, i: int) -> Tensor:
        logp = process_logits(logits, temperature, top_k)
        return map_tokens(eps[:, i], logp, codes, steps)[0].to(y.device)

    return ar.generate(y, choose=choose)


class Student(nn.Module):
    """The DD student: the AR transformer reading noise tokens, all tokens in one pass.

    Position j (which the teacher uses to predict token j + 1) gets its usual input — the
    class at j = 0, else the embedding of token j when that token is known, else a learned
    'unknown' embedding — plus ``proj(eps_{j+1})``, the noise token of the token it
    predicts. Causal attention then lets the output at j depend on eps_1..eps_{j+1} and the
    known prefix, exactly what the map's token j + 1 depends on. ``proj`` starts at zero, so
    with every token known the student starts as the teacher. One step: no token known;
    two steps: the first ``m`` tokens of the one-step output are fed back as known tokens.
    """

    def __init__(self, teacher: nn.Module, code_dim: int) -> None:
        super().__init__()
        import copy

        self.ar = copy.deepcopy(teacher).requires_grad_(True)
        dim = self.ar.tok.embedding_dim
        self.proj = nn.Linear(code_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.unknown = nn.Parameter(torch.zeros(dim))

    def forward(
        self, eps: Tensor, y: Tensor, tokens: Tensor | None = None, known: int | Tensor = 0
    ) -> Tensor:
        """Logits (B, L, vocab) for tokens 1..L; ``tokens`` (B, L) supplies the first
        ``known`` of them (an int or one count per sample)."""
        b, length, _ = eps.shape
        if tokens is None:
            tokens = torch.zeros(b, length, dtype=torch.long, device=eps.device)
        h = self.ar.inputs(tokens[:, : length - 1], y)  # class, tok_1 .. tok_{L-1}
        known = torch.as_tensor(known, device=eps.device).reshape(-1, 1).expand(b, 1)
        j = torch.arange(length, device=eps.device).view(1, -1)
        is_known = (j == 0) | (j <= known)  # position j holds token j (1-based) when known
        h = torch.where(is_known.unsqueeze(-1), h, self.unknown.to(h.dtype))
        return self.ar.run(h + self.proj(eps))

    @torch.no_grad()
    def sample(self, eps: Tensor, y: Tensor, steps: int = 1) -> Tensor:
        """Tokens from noise in one step, or two (the first half fed back)."""
        if steps not in (1, 2):
            raise ValueError(f"the student samples in 1 or 2 steps, not {steps}")
        tokens = self(eps, y).argmax(-1)
        if steps == 2:
            m = eps.shape[1] // 2
            second = self(eps, y, tokens, known=m).argmax(-1)
            tokens = torch.cat([tokens[:, :m], second[:, m:]], dim=1)
        return tokens

    def loss(self, eps: Tensor, y: Tensor, tokens: Tensor, known: Tensor) -> Tensor:
        """Cross-entropy on the tokens after the known prefix."""
        logits = self(eps, y, tokens, known)
        j = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        weight = (j >= known.view(-1, 1)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        return (ce * weight).sum() / weight.sum().clamp_min(1)


@torch.no_grad()
def generate_dataset(
    ar,
    codes: Tensor,
    n: int,
    path,
    num_classes: int,
    steps: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Write ``n`` (noise sequence, token sequence, label) triples of :func:`map_sequence`
    to ``path`` as memory-mapped ``.npy`` files in chapter 01's coupling format, and return
    them as a :class:`~osdlib.methods.rectified_flow.PairSet` (``x``: tokens as floats,
    ``z``: noise (n, L, D), ``y``: balanced labels)."""
    import json
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from ..train import show_progress
    from .rectified_flow import PairSet

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    length, dim = ar.length, codes.shape[1]
    z_mm = np.lib.format.open_memmap(path / "z.npy", "w+", np.float32, (n, length, dim))
    x_mm = np.lib.format.open_memmap(path / "x.npy", "w+", np.float32, (n, length))
    labels = torch.arange(n) % num_classes
    np.save(path / "y.npy", labels.numpy().astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    codes = codes.to(device)
    for i in tqdm(
        range(0, n, batch), desc="DD map", disable=not show_progress(progress), mininterval=5
    ):
        m = min(batch, n - i)
        eps = torch.randn(m, length, dim, generator=g)
        y = labels[i : i + m].to(device)
        tokens = map_sequence(ar, y, eps.to(device), codes, steps, temperature, top_k)
        z_mm[i : i + m] = eps.numpy()
        x_mm[i : i + m] = tokens.cpu().numpy().astype(np.float32)
    z_mm.flush()
    x_mm.flush()
    del z_mm, x_mm
    meta = {"n": n, "shape": [length, dim], "steps": steps, "labels": True, "t_max": 1.0}
    meta |= {"temperature": temperature, "top_k": top_k}
    (path / "meta.json").write_text(json.dumps(meta))
    return PairSet(path)


def train_student(student: Student, pairs, steps: int, batch: int = 256, **kwargs):
    """Cross-entropy on the mapped tokens; half of each batch learns the one-step task (no
    token known), half the second step (the first half of the tokens known)."""
    from ..train import train

    def loss_fn(m, b, g):
        tokens, eps, y = b
        tokens = tokens.long()
        known = (torch.arange(len(tokens), device=tokens.device) % 2) * (tokens.shape[1] // 2)
        return m.loss(eps, y, tokens, known)

    return train(
        student,
        loss_fn,
        lambda g: pairs.batch(batch, g),
        steps,
        desc=kwargs.pop("desc", "DD student"),
        **kwargs,
    )


def naive_marginals(tokens: Tensor, labels: Tensor, vocab: int, num_classes: int) -> Tensor:
    """Per class and position, the frequency of each token: (classes, L, vocab). Sampling
    every position independently from it is the naive one-step baseline."""
    counts = torch.zeros(num_classes, tokens.shape[1], vocab)
    for c in range(num_classes):
        sel = tokens[labels == c]
        counts[c] = torch.nn.functional.one_hot(sel, vocab).float().sum(0)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def sample_naive(marginals: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Every token drawn independently from its class-and-position marginal (on the
    marginals' device, with a generator on that device)."""
    p = marginals[y.to(marginals.device)]  # (B, L, vocab)
    flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator)
    return flat.view(p.shape[0], p.shape[1])
