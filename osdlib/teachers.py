"""Teachers: one interface over every multi-step model that later chapters distil.

A :class:`Teacher` answers, at flow time t (or EDM noise level sigma = t / (1 - t)) and an
optional class label y, with a velocity, a denoised estimate x0, an epsilon estimate or a
score, and samples with the ODE samplers of :mod:`osdlib.samplers`.

Implementations:

* :class:`FlowTeacher` — a velocity network trained by flow matching in chapter 00.
* :class:`DDPMTeacher` — a diffusers epsilon-prediction UNet with a DDPM (VP) schedule,
  e.g. ``google/ddpm-cifar10-32``, turned into the same probability-flow ODE.

:func:`get_teacher` loads a chapter-00 teacher from a cache directory or trains it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from . import paths, samplers


class Teacher(nn.Module):
    """Base class. Subclasses implement :meth:`velocity`; the rest follows from paths."""

    #: the times between which the model is valid (the ODE starts at t_max)
    t_min: float = 0.0
    t_max: float = 1.0
    num_classes: int | None = None
    shape: tuple[int, ...] = ()

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.velocity(x, t, y)

    def x0(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return paths.velocity_to_x0(self.velocity(x, t, y), x, t)

    def eps(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return paths.velocity_to_eps(self.velocity(x, t, y), x, t)

    def score(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return paths.velocity_to_score(self.velocity(x, t, y), x, t)

    def denoise(self, x_sigma: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        """EDM-style denoiser D(x + sigma z; sigma) -> x, with x_sigma = x_t / (1 - t)."""
        t = paths.sigma_to_t(sigma).to(x_sigma)
        return self.x0(x_sigma * (1 - paths._b(t, x_sigma)), t, y)

    def prior(
        self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> Tensor:
        """Starting points x_{t_max} ~ t_max * N(0, I) (the data term (1 - t_max) x is dropped)."""
        z = torch.randn(n, *self.shape, generator=generator)
        return (self.t_max * z).to(device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 100,
        solver: str = "euler",
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        z: Tensor | None = None,
        keep_trajectory: bool = False,
    ) -> samplers.SampleResult:
        device = next(self.parameters()).device
        x = self.prior(n, generator, device) if z is None else z.to(device) * self.t_max
        if y is not None:
            y = y.to(device)
        return samplers.solve(
            self.velocity, x, steps, solver, y, self.t_max, self.t_min, keep_trajectory
        )


class FlowTeacher(Teacher):
    """A velocity network ``net(x, t, y)`` trained by flow matching (t in [0, 1])."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...], num_classes: int | None = None):
        super().__init__()
        self.net = net
        self.shape = tuple(shape)
        self.num_classes = num_classes

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)


class DDPMTeacher(Teacher):
    """A diffusers epsilon-prediction UNet with a discrete VP (DDPM) schedule, as a flow ODE.

    At flow time t the VP input with the same SNR is x_vp = sqrt(abar) / (1 - t) * x_t, the
    matching (fractional) DDPM timestep is found by interpolating log-SNR over the
    scheduler's ``alphas_cumprod``, and eps = unet(x_vp, timestep) gives
    v = (eps - x_t) / (1 - t) (see :mod:`osdlib.paths`). Times are clipped to the range the
    schedule covers: t_max = t(sigma_max) (0.9937 for the DDPM CIFAR-10 schedule).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type != "epsilon":
            raise ValueError(
                f"only epsilon-prediction DDPM checkpoints are supported, got {prediction_type!r}"
            )
        self.unet = unet
        a = alphas_cumprod.double()
        self.register_buffer("log_snr", torch.log(a / (1 - a)).float())  # decreasing in timestep
        sig = paths.alpha_bar_to_sigma(a)
        self.t_min = float(paths.sigma_to_t(sig[0]))
        self.t_max = float(paths.sigma_to_t(sig[-1]))
        cfg = unet.config
        self.shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.num_classes = cfg.num_class_embeds

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: str = "cpu", **kwargs
    ) -> DDPMTeacher:
        """Load ``UNet2DModel`` + ``DDPMScheduler`` from a hub id or a local directory
        (the layout written by ``DDPMPipeline.save_pretrained``)."""
        from diffusers import DDPMScheduler, UNet2DModel

        unet = UNet2DModel.from_pretrained(name_or_path, subfolder="unet", **kwargs)
        sched = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kwargs)
        return cls(unet, sched.alphas_cumprod, sched.config.prediction_type).to(device).eval()

    def timestep(self, t: Tensor) -> Tensor:
        """The fractional DDPM timestep whose log-SNR equals that of flow time t."""
        sigma = paths.t_to_sigma(t.clamp(self.t_min, self.t_max).double())
        log_snr = (-2 * torch.log(sigma)).float()
        ls = self.log_snr.to(t.device)
        # log_snr is decreasing: search on the negated, increasing sequence
        idx = torch.searchsorted(-ls, -log_snr).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        frac = ((lo - log_snr) / (lo - hi)).clamp(0, 1)
        return (idx - 1).float() + frac

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = t.reshape(-1).expand(len(x)).to(x)
        t = t.clamp(self.t_min, self.t_max)
        sigma = paths.t_to_sigma(t)
        scale = torch.sqrt(paths.sigma_to_alpha_bar(sigma)) / (1 - t)
        x_vp = paths._b(scale, x) * x
        eps = self.unet(x_vp, self.timestep(t), class_labels=y).sample
        return paths.eps_to_velocity(eps, x, t)


# --------------------------------------------------------------------------------------
# The chapter-00 teacher, loaded from a cache or trained when missing
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$OSD_CACHE_DIR`` or ``~/.cache/osd``: where trained teachers are kept."""
    return Path(os.environ.get("OSD_CACHE_DIR", Path.home() / ".cache" / "osd"))


def teacher_spec(settings: dict) -> dict:
    """The settings that determine a chapter-00 image teacher (its cache key)."""
    keys = (
        "image_data",
        "image_net",
        "image_steps",
        "image_batch",
        "image_lr",
        "ema_decay",
        "seed",
    )
    return {k: settings[k] for k in keys}


def _key(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True).encode()
    return f"{spec['image_data']}-{spec['image_net']}-{hashlib.sha1(blob).hexdigest()[:10]}"


def get_teacher(
    settings: dict,
    data=None,
    retrain: bool = False,
    root: str | Path | None = None,
    progress: bool = True,
):
    """The chapter-00 image teacher for ``settings`` (see :func:`teacher_spec`).

    Loads ``<root>/teachers/<key>/teacher.safetensors`` when present; otherwise trains it with
    :func:`osdlib.methods.flow_matching.train_image_teacher` (the code chapter 00 shows) and
    saves it there. Returns ``(teacher, info)``; ``info`` records whether it was trained,
    the training history and wall time.
    """
    from . import data as data_mod
    from . import nets
    from .methods import flow_matching
    from .train import load_weights, save_weights

    spec = teacher_spec(settings)
    folder = Path(root or cache_dir()) / "teachers" / _key(spec)
    device = settings.get("device", "cpu")
    if data is None:
        data = data_mod.load(spec["image_data"], download=settings.get("download", False))
    with torch.random.fork_rng():  # the same initial weights whatever ran before
        torch.manual_seed(spec["seed"])
        net = nets.build(spec["image_net"], data.shape, data.num_classes)
    weights = folder / "teacher.safetensors"
    if weights.exists() and not retrain:
        load_weights(net, weights)
        info = json.loads((folder / "info.json").read_text())
        info["trained_now"] = False
    else:
        net, info = flow_matching.train_image_teacher(net, data, settings, progress=progress)
        save_weights(net, weights)
        (folder / "info.json").write_text(json.dumps({**info, "spec": spec}, indent=1))
        info["trained_now"] = True
    info["path"] = str(weights)
    teacher = FlowTeacher(net, data.shape, data.num_classes).to(device).eval()
    return teacher, info
