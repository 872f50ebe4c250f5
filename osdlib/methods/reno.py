"""ReNO: reward-based noise optimisation of a frozen one-step generator — chapter 05.

A one-step generator maps noise to an image in one network call, x = G(z, y). ReNO (Eyring
et al. 2024) keeps G frozen and moves z at test time to raise differentiable rewards
r_i(x) (higher is better). It minimises

    L(z) = - sum_i w_i r_i(G(z, y))  +  lambda * (0.5 ||z||^2 - (d - 1) log ||z||)

where the second term is the negative log-likelihood of the noise norm ||z|| under its chi
distribution with d degrees of freedom (d = the number of entries of one z): it keeps z on
the shell ||z|| ~ sqrt(d - 1) where G was trained, instead of letting it drift to
adversarial inputs. The optimiser is SGD with Nesterov momentum 0.9; each sample's gradient
is clipped to norm ``clip`` before the step, so in practice every step has length about
lr * clip (ReNO: lr 5, clip 0.1 at d = 4 x 64 x 64 for SD-Turbo). :func:`scaled_step` keeps
that step the same fraction of ||z|| at another d. After ``steps`` forward passes the
returned image is, per sample, the iterate with the highest weighted reward (the regulariser
does not choose it), as in the ReNO code.

Everything here works on a batch of independent problems: sample b's loss, clipping,
momentum and best iterate depend only on z_b. A reward is any callable ``r(x, y) -> (B,)``;
the generator is any callable ``G(z, y) -> x``. Nothing here knows about a data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Reward = Callable[[Tensor, Tensor | None], Tensor]
Generator = Callable[[Tensor, Tensor | None], Tensor]

# ReNO's settings for SD-Turbo: 50 iterations, SGD lr 5 with Nesterov momentum 0.9, gradient
# norm clipped to 0.1, regulariser weight 0.01, noise of 4 x 64 x 64 latents.
RENO_LR, RENO_CLIP, RENO_LAMBDA, RENO_STEPS, RENO_DIM = 5.0, 0.1, 0.01, 50, 4 * 64 * 64


def noise_nll(z: Tensor) -> Tensor:
    """Per-sample 0.5 ||z||^2 - (d - 1) log ||z|| in float32 (the chi negative log-likelihood
    of the norm, up to a constant; d = z[0].numel()). Its minimum is at ||z|| = sqrt(d - 1)."""
    d = z[0].numel()
    norm = torch.linalg.vector_norm(z.flatten(1).float(), dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def scaled_step(
    d: int, lr: float = RENO_LR, clip: float = RENO_CLIP, d_ref: int = RENO_DIM
) -> tuple[float, float]:
    """(lr, clip) for noise of dimension ``d`` whose clipped step lr * clip is the same
    fraction of the shell radius sqrt(d) as ReNO's at ``d_ref``: lr stays, clip scales by
    sqrt(d / d_ref). (At d = 64, the 8x8 digits: clip 0.00625.)"""
    return lr, clip * math.sqrt(d / d_ref)


def clip_per_sample(grad: Tensor, max_norm: float) -> Tensor:
    """Scale each sample's gradient down to norm ``max_norm`` (those below are unchanged)."""
    norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12)
    factor = (max_norm / norm).clamp(max=1.0)
    return grad * factor.view(-1, *([1] * (grad.dim() - 1)))


def weighted_reward(
    x: Tensor, y: Tensor | None, rewards: Sequence[tuple[Reward, float]]
) -> tuple[Tensor, list[Tensor]]:
    """(sum_i w_i r_i(x, y), [r_i(x, y)]), each of shape (B,)."""
    parts = [r(x, y) for r, _ in rewards]
    total = sum(w * p for (_, w), p in zip(rewards, parts, strict=True))
    return total, parts


@dataclass
class ReNOResult:
    """What :func:`reno` returns. ``x``/``z``: the best iterate per sample; ``reward``: its
    weighted reward; ``history``: per iteration, tensors of shape (steps, B) for ``reward``
    (weighted), ``norm`` (||z||) and ``reward_<i>`` (each reward); ``snapshots``: images at
    the iterations asked for; ``forward_passes``: generator calls per sample."""

    x: Tensor
    z: Tensor
    reward: Tensor
    initial_reward: Tensor
    best_step: Tensor
    history: dict[str, Tensor] = field(default_factory=dict)
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    forward_passes: int = 0


def reno(
    G: Generator,
    z: Tensor,
    y: Tensor | None,
    rewards: Sequence[tuple[Reward, float]],
    steps: int = RENO_STEPS,
    lr: float | None = None,
    clip: float | None = None,
    lam: float = RENO_LAMBDA,
    momentum: float = 0.9,
    nesterov: bool = True,
    snapshot_at: Sequence[int] = (),
) -> ReNOResult:
    """Optimise the noise ``z`` (B, ...) of the frozen generator ``G`` for ``rewards``.

    ``steps`` forward passes (ReNO: 50); the last one is evaluated, not stepped. ``lr`` and
    ``clip`` default to :func:`scaled_step` for this z's dimension; ``lam`` weighs
    :func:`noise_nll` (``lam = 0``: no regulariser). G's parameters are not touched (its
    gradients are not computed); ``z`` itself is not modified.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not rewards:
        raise ValueError("reno needs at least one (reward, weight)")
    d = z[0].numel()
    default_lr, default_clip = scaled_step(d)
    lr = default_lr if lr is None else lr
    clip = default_clip if clip is None else clip
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov)
    hist: dict[str, list[Tensor]] = {"reward": [], "norm": []}
    snapshots: dict[int, Tensor] = {}
    best_x = best_z = best_r = first_r = best_step = None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x = G(z, y)
        total, parts = weighted_reward(x, y, rewards)
        with torch.no_grad():
            r = total.detach().float()
            hist["reward"].append(r.cpu())
            hist["norm"].append(torch.linalg.vector_norm(z.flatten(1), dim=1).cpu())
            for i, p in enumerate(parts):
                hist.setdefault(f"reward_{i}", []).append(p.detach().float().cpu())
            if step in snapshot_at:
                snapshots[step] = x.detach().float().cpu()
            if best_r is None:
                first_r, best_r = r.clone(), r.clone()
                best_x, best_z = x.detach().clone(), z.detach().clone()
                best_step = torch.zeros(len(r), dtype=torch.long, device=r.device)
            else:
                better = r > best_r
                best_r = torch.where(better, r, best_r)
                best_x[better] = x.detach()[better].to(best_x.dtype)
                best_z[better] = z.detach()[better]
                best_step[better] = step
        if step == steps - 1:
            break
        loss = -total.sum()
        if lam > 0:
            loss = loss + lam * noise_nll(z).sum()
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = clip_per_sample(grad, clip)
        opt.step()
    return ReNOResult(
        x=best_x,
        z=best_z,
        reward=best_r,
        initial_reward=first_r,
        best_step=best_step,
        history={k: torch.stack(v) for k, v in hist.items()},
        snapshots=snapshots,
        forward_passes=steps,
    )


@torch.no_grad()
def best_of_n(
    G: Generator,
    shape: tuple[int, ...],
    y: Tensor | None,
    rewards: Sequence[tuple[Reward, float]],
    n: int,
    batch: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    z0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The baseline at equal forward passes: for each of ``batch`` problems (label ``y[b]``),
    draw ``n`` noises (the first is ``z0[b]`` when given), keep the sample with the highest
    weighted reward. Returns (x, z, reward) of the winners."""
    best_x = best_z = best_r = None
    for i in range(n):
        if i == 0 and z0 is not None:
            z = z0.to(device)
        else:
            z = torch.randn(batch, *shape, generator=generator).to(device)
        x = G(z, y)
        r, _ = weighted_reward(x, y, rewards)
        if best_r is None:
            best_x, best_z, best_r = x.clone(), z.clone(), r.clone()
        else:
            better = r > best_r
            best_r = torch.where(better, r, best_r)
            best_x[better], best_z[better] = x[better].to(best_x.dtype), z[better]
    return best_x, best_z, best_r


# --------------------------------------------------------------------------------------
# Rewards that need nothing but a classifier or the image itself
# --------------------------------------------------------------------------------------


class ClassLogProb:
    """r(x, y) = log p(y | x) under a frozen classifier (images in [-1, 1])."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier.eval().requires_grad_(False)

    def __call__(self, x: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("ClassLogProb needs the target labels y")
        logp = torch.log_softmax(self.classifier(x.clamp(-1, 1)).float(), dim=1)
        return logp.gather(1, y.view(-1, 1)).squeeze(1)


class MeanIntensity:
    """r(x) = -((mean pixel value in [0, 1]) - target)^2 / scale^2: a reward that is not a
    class (on digits, how much ink: stroke thickness; on photos, brightness)."""

    def __init__(self, target: float, scale: float = 0.05) -> None:
        self.target, self.scale = target, scale

    @staticmethod
    def value(x: Tensor) -> Tensor:
        return ((x.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return -(((self.value(x) - self.target) / self.scale) ** 2)
