"""Score distillation: one-step generators trained by the difference of two scores — ch. 03, 04.

A generator G(z, y) makes x. Noise it, x_sigma = x + sigma e (flow time t = sigma / (1 + sigma),
x_t = (1 - t) x_sigma), and compare two scores at x_sigma: the teacher's ("real",
the data's) and the score of G's own distribution ("fake", a network trained online on G's
samples). The generator descends

    grad_x = w(sigma) h(r) (s_fake(x_sigma) - s_real(x_sigma)),   s = (D(x_sigma) - x_sigma) / sigma^2

(D a denoiser), applied as the loss 0.5 ||x - stopgrad(x - grad_x)||^2, whose gradient with
respect to x is grad_x; no gradient flows through either score network. This is the
gradient of a KL divergence between the noised distributions of G and of the data, and the
same for every parameterisation of the path: x_t is a rescaling of x_sigma, and the factor
(1 - t) of the chain rule cancels the one between the two scores.

The methods are choices of the weighting w, the per-sample factor h and extra losses:

* Diff-Instruct: w = 1;  VSD (ProlificDreamer, SwiftBrush): w = sigma^2 (the epsilon form,
  grad = D_fake - D_real);  DMD / DMD2: w = sigma^2 / mean|x - D_real(x_sigma)| per sample.
* SDS (no fake score): D_fake is replaced by x itself, the fake score by the conditional
  score of the noise that was added — it pulls every sample to a mode.
* f-distill: h(r) with r = p_data / p_G at x_sigma from a discriminator, h = 1 (reverse KL),
  r (forward KL), r / (1 + r) (Jensen-Shannon).
* DMD2: several fake-score updates per generator update (two time-scale rule), a GAN loss
  from a head on the fake-score network's bottleneck, backward simulation for few-step G.
* DMD: a regression loss on teacher (noise, sample) pairs and no TTUR.

Noise levels: t ~ U[t_lo, t_hi] in flow time (the teacher's training distribution, U[0, 1],
cut at both ends; DMD's 0.02 ... 0.98 of the teacher's range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nets, paths
from ..paths import _b
from ..teachers import FlowTeacher, Teacher
from ..train import TrainResult, borrowed, train
from . import flow_matching

WEIGHTINGS = ("diff-instruct", "vsd", "dmd")
DIVERGENCES = ("reverse-kl", "forward-kl", "js")


# --------------------------------------------------------------------------------------
# The shared gradient
# --------------------------------------------------------------------------------------


def dmd_normaliser(x: Tensor, d_real: Tensor) -> Tensor:
    """DMD's per-sample normaliser mean |x - D_real(x_sigma)| over all of a sample's entries."""
    return (x - d_real).abs().flatten(1).mean(1)


def weight(kind: str, sigma: Tensor, x: Tensor, d_real: Tensor) -> Tensor:
    """w(sigma) per sample: 1 (Diff-Instruct), sigma^2 (VSD), sigma^2 / normaliser (DMD)."""
    if kind == "diff-instruct":
        return torch.ones_like(sigma)
    if kind == "vsd":
        return sigma**2
    if kind == "dmd":
        return sigma**2 / dmd_normaliser(x, d_real).clamp_min(1e-8)
    raise ValueError(f"unknown weighting {kind!r}; valid: {', '.join(WEIGHTINGS)}")


def h_of_r(divergence: str, r: Tensor) -> Tensor:
    """f-distill's per-sample factor h(r) = f''(r) r^2 for the density ratio r = p_data / p_G."""
    if divergence == "reverse-kl":
        return torch.ones_like(r)
    if divergence == "forward-kl":
        return r
    if divergence == "js":
        return r / (1 + r)
    raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")


def distillation_gradient(
    x: Tensor,
    x_sigma: Tensor,
    sigma: Tensor,
    d_real: Tensor,
    d_fake: Tensor,
    weighting: str = "dmd",
    h: Tensor | None = None,
) -> Tensor:
    """grad_x = w(sigma) h (s_fake - s_real) with s = (D - x_sigma) / sigma^2, i.e.
    w(sigma) h (D_fake - D_real) / sigma^2 (``x_sigma`` cancels; it is kept for clarity)."""
    s_fake = (d_fake - x_sigma) / _b(sigma**2, x)
    s_real = (d_real - x_sigma) / _b(sigma**2, x)
    w = weight(weighting, sigma, x, d_real)
    if h is not None:
        w = w * h
    return _b(w, x) * (s_fake - s_real)


def gradient_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 ||x - stopgrad(x - grad)||^2 summed over a sample, averaged over the batch: its
    gradient with respect to each sample x_i is grad_i / batch size."""
    target = (x - grad).detach()
    return 0.5 * (x - target).pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------
# Networks: the generator, the fake score and the GAN/ratio head
# --------------------------------------------------------------------------------------


class Generator(nn.Module):
    """A velocity net read as a generator: G(x_t, t, y) = x_t - t v(x_t, t, y) (the x0
    estimate). One step: x = G(z, 1). Initialised from a teacher, one step gives the
    teacher's (blurry) x0 estimate at pure noise. ``times`` are the steps of few-step
    sampling, e.g. (1.0, 0.75, 0.5, 0.25): after each step the output is re-noised to the
    next t with fresh noise (as DMD2's 4-step generator)."""

    def __init__(self, net: nn.Module, times: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.net, self.times = net, tuple(times)

    def forward(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(len(x_t))
        return paths.velocity_to_x0(self.net(x_t, t, y), x_t, t)

    def run(
        self,
        z: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The first ``steps`` steps of sampling from z: returns (input of the last step,
        its t). ``steps=None`` or ``len(times)`` gives the input of the final step."""
        steps = len(self.times) if steps is None else steps
        x_t = z * self.times[0]
        for i in range(steps - 1):
            x0 = self(x_t, self.times[i], y)
            e = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x_t = paths.interpolate(x0, e, self.times[i + 1])
        return x_t, torch.full((len(z),), self.times[steps - 1], device=z.device)

    @torch.no_grad()
    def sample(
        self, z: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Samples with all ``times`` (one network evaluation each)."""
        x_t, t = self.run(z, y, generator)
        return self(x_t, t, y)


class Discriminator(nn.Module):
    """A linear head on a network's bottleneck features (DMD2: the fake-score network's).
    ``forward(x_t, t, y)`` returns one logit per sample, an estimate of log p_data / p_G at
    the noised point once trained with :func:`gan_critic_loss`."""

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net

        def head() -> nn.Module:
            return nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, 1))

        # an ensemble of fake nets (several toy seeds at once) gets one head per member
        members = getattr(net, "members", None)
        self.head = nets.Ensemble([head() for _ in range(members)]) if members else head()

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.head(self.net.features(x_t, t, y)).squeeze(1)


def feature_dim(net: nn.Module, shape: tuple[int, ...], num_classes: int | None = None) -> int:
    """The width of ``net.features`` (found with one small forward pass)."""
    p = next(net.parameters())
    n = getattr(net, "members", 1)  # an Ensemble needs one row per member
    x = torch.zeros(n, *shape, device=p.device)
    y = torch.zeros(n, dtype=torch.long, device=p.device) if num_classes else None
    with torch.no_grad():
        return net.features(x, torch.full((n,), 0.5, device=p.device), y).shape[1]


def frozen(module: nn.Module, *args):
    """Call ``module`` with its parameters detached: gradients reach the inputs only (the
    generator's GAN term must not train the discriminator)."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def gan_critic_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """Non-saturating logistic GAN loss of the critic: softplus(-l_real) + softplus(l_fake)."""
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


def gan_generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator: softplus(-l_fake)."""
    return F.softplus(-logit_fake).mean()


# --------------------------------------------------------------------------------------
# One recipe for every method
# --------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """The choices that make Diff-Instruct, VSD, DMD, DMD2 or f-distill out of one loop.

    * ``weighting``: "diff-instruct" | "vsd" | "dmd" (see :func:`weight`).
    * ``fake``: "online" (trained on G's samples), "stale" (never updated after its
      initialisation) or "none" (SDS: D_fake = x).
    * ``gen_every``: the generator is updated every ``gen_every`` iterations, the fake score
      (and discriminator) every iteration — DMD2's two time-scale rule uses 5; 1 is DMD.
    * ``gan_gen`` / ``gan_critic``: GAN loss weights on the generator / critic side (DMD2's
      code: 3e-3 / 1e-2; 0 switches the GAN off).
    * ``divergence``: f-distill's h(r) (needs a discriminator: set ``gan_critic`` > 0).
    * ``regression``: weight of DMD's regression loss on teacher pairs (0 = off).
    * ``t_range``: flow times of the noise levels, t ~ U[t_lo, t_hi].
    """

    weighting: str = "dmd"
    fake: str = "online"
    gen_every: int = 1
    gan_gen: float = 0.0
    gan_critic: float = 0.0
    divergence: str = "reverse-kl"
    regression: float = 0.0
    t_range: tuple[float, float] = (0.02, 0.98)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.fake not in ("online", "stale", "none"):
            raise ValueError(f"fake must be 'online', 'stale' or 'none', got {self.fake!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.divergence != "reverse-kl" and self.gan_critic <= 0:
            raise ValueError("f-distill needs a trained discriminator: set gan_critic > 0")
        if self.gen_every < 1:
            raise ValueError("gen_every must be >= 1")


class Distiller(nn.Module):
    """The trainable parts: generator, fake score (a velocity net) and, for GAN or
    f-distill, a discriminator head on the fake net's features."""

    def __init__(
        self,
        generator: Generator,
        fake_net: nn.Module,
        shape: tuple[int, ...],
        num_classes: int | None = None,
        discriminator: bool = False,
    ) -> None:
        super().__init__()
        # copies of a frozen teacher arrive with requires_grad False: all of this trains
        self.generator = generator.requires_grad_(True)
        self.fake = FlowTeacher(fake_net, shape, num_classes).requires_grad_(True)
        self.disc = (
            Discriminator(fake_net, feature_dim(fake_net, shape, num_classes))
            if discriminator
            else None
        )


def fit_fake(
    fake_net: nn.Module,
    generator: Generator,
    shape: tuple[int, ...],
    steps: int,
    batch: int = 512,
    **kwargs,
) -> TrainResult:
    """Fit a fake-score network to the current samples of an unconditional ``generator`` by
    flow matching (the generator is not changed) — the fake score's start when it is not a
    copy of a teacher (the 2-D toys)."""

    def batch_fn(g: torch.Generator) -> Tensor:
        return generator.sample(torch.randn(batch, *shape, generator=g))

    return train(
        fake_net,
        lambda m, x, g: flow_matching.loss(m, x, None, g),
        batch_fn,
        steps,
        desc=kwargs.pop("desc", "fake score warm-up"),
        **kwargs,
    )


def _noised(x: Tensor, t_range, generator) -> tuple[Tensor, Tensor, Tensor]:
    """x_t = (1 - t) x + t e with t ~ U[t_lo, t_hi]; returns (x_t, t, sigma)."""
    lo, hi = t_range
    t = lo + (hi - lo) * torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)
    e = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return paths.interpolate(x, e, t), t, paths.t_to_sigma(t)


def _generator_input(G: Generator, z: Tensor, y, g) -> tuple[Tensor, Tensor]:
    """Backward simulation: a random number of the generator's own steps (no gradient), so
    the input of the trained step is what G makes at test time. One step: (z, 1)."""
    k = 1
    if len(G.times) > 1:
        k = int(torch.randint(1, len(G.times) + 1, (1,), generator=g, device=g.device))
    with torch.no_grad():
        return G.run(z, y, g, k)


def loss_fn(
    recipe: Recipe,
    real: Teacher,
    model: Distiller,
    batch,
    g: torch.Generator,
    step: int,
    pairs=None,
) -> tuple[Tensor, dict[str, float]]:
    """One iteration: the fake-score (and critic) loss, plus, every ``gen_every`` iterations,
    the generator's loss. The two act on disjoint parameters, so one backward pass and one
    optimizer (with a parameter group each) update both."""
    x_real, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
    G, fake, disc = model.generator, model.fake, model.disc
    z = torch.randn(x_real.shape, generator=g, device=x_real.device, dtype=x_real.dtype)
    x_in, t_in = _generator_input(G, z, y, g)
    total = x_real.new_zeros(())
    logs: dict[str, float] = {}

    # --- the fake score (and the critic): every iteration ---------------------------------
    if recipe.fake == "online" or disc is not None:
        with torch.no_grad():
            x_gen = G(x_in, t_in, y)
        if recipe.fake == "online":
            fake_loss = flow_matching.loss(fake.net, x_gen, y, g)
            total = total + fake_loss
            logs["fake"] = fake_loss.item()
        if disc is not None:
            xr_t, tr, _ = _noised(x_real, recipe.t_range, g)
            xg_t, tg, _ = _noised(x_gen, recipe.t_range, g)
            critic = gan_critic_loss(disc(xr_t, tr, y), disc(xg_t, tg, y))
            total = total + recipe.gan_critic * critic
            logs["critic"] = critic.item()

    # --- the generator: every gen_every iterations --------------------------------------
    if step % recipe.gen_every == 0:
        x = G(x_in, t_in, y)
        x_t, t, sigma = _noised(x.detach(), recipe.t_range, g)
        x_sigma = x_t / _b(1 - t, x_t)
        with torch.no_grad():
            d_real = real.denoise(x_sigma, sigma, y)
            d_fake = x.detach() if recipe.fake == "none" else fake.denoise(x_sigma, sigma, y)
            h = None
            if recipe.divergence != "reverse-kl":
                r = torch.exp(disc(x_t, t, y).clamp(-10, 10))
                h = h_of_r(recipe.divergence, r)
                # keep the step size comparable across divergences (per ensemble member)
                members = getattr(G.net, "members", 1)
                h = h / h.reshape(members, -1).mean(1).repeat_interleave(len(h) // members)
        grad = distillation_gradient(x, x_sigma, sigma, d_real, d_fake, recipe.weighting, h)
        gen_loss = gradient_loss(x, grad)
        total = total + gen_loss
        logs["gen"] = gen_loss.item()
        if recipe.gan_gen > 0:
            xg_t, tg, _ = _noised(x, recipe.t_range, g)  # with gradient to x
            adv = gan_generator_loss(frozen(disc, xg_t, tg, y))
            total = total + recipe.gan_gen * adv
            logs["gan_gen"] = adv.item()
        if recipe.regression > 0:
            xp, zp, yp = pairs.batch(len(x), g if g.device.type == "cpu" else None)
            yp = None if yp is None else yp.to(x.device)
            reg = (G(zp.to(x) * G.times[0], G.times[0], yp) - xp.to(x)).pow(2).flatten(1).mean(1)
            reg = reg.mean()
            total = total + recipe.regression * reg
            logs["regression"] = reg.item()
    return total, logs


def distill(
    recipe: Recipe,
    real: Teacher,
    model: Distiller,
    batch_fn,
    steps: int,
    lr: float = 1e-4,
    fake_lr: float | None = None,
    pairs=None,
    betas: tuple[float, float] = (0.0, 0.99),
    **kwargs,
) -> TrainResult:
    """Train ``model`` (a :class:`Distiller`) with ``recipe`` for ``steps`` iterations.

    ``pairs``: teacher (noise, sample) pairs for DMD's regression loss, anything with
    ``.batch(n, generator) -> (x, z, y)`` such as :class:`~osdlib.methods.rectified_flow.PairSet`
    (the generator's one-step output from z is regressed onto x with the mean squared error).
    ``batch_fn(generator)`` gives real data (x or (x, y)): the labels condition G and the
    scores, the images feed the GAN critic. Adam with ``betas`` (default (0, 0.99), a GAN
    habit; DMD2 uses AdamW (0.9, 0.999) at much smaller learning rates), one parameter
    group for G and one for the fake score + head at ``fake_lr`` (default ``lr``). The
    EMA (``ema_decay``, per iteration) is of the whole :class:`Distiller`; evaluate
    ``result.ema.generator``. Under torchrun the generator's skipped iterations need
    nothing special: :func:`~osdlib.train.train` averages each gradient over the ranks that
    have one.
    """
    if recipe.regression > 0 and pairs is None:
        raise ValueError("the regression loss needs teacher pairs (pairs=PairSet)")
    if (recipe.gan_gen > 0 or recipe.gan_critic > 0) and model.disc is None:
        raise ValueError("a GAN loss needs a Distiller built with discriminator=True")
    real = real.eval()  # only ever called under no_grad; its requires_grad is left alone
    critic_params = [p for n, p in model.named_parameters() if not n.startswith("generator.")]
    opt = torch.optim.Adam(
        [
            {"params": list(model.generator.parameters()), "lr": lr},
            {"params": critic_params, "lr": fake_lr or lr},
        ],
        betas=betas,
    )
    if recipe.fake == "stale" and model.disc is None:
        model.fake.requires_grad_(False)

    def fn(m, batch, g, step):
        return loss_fn(recipe, real, m, batch, g, step, pairs)

    kwargs.setdefault("grad_clip", None)
    # the real score runs where the training runs (a CPU toy teacher on a GPU run)
    with borrowed(real, kwargs.get("device", "cpu")):
        return train(
            model, fn, batch_fn, steps, optimizer=opt, desc=kwargs.pop("desc", "distill"), **kwargs
        )
