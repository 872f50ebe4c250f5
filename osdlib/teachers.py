"""Teachers: one interface over every multi-step model that later chapters distil.

A :class:`Teacher` answers, at flow time t (or EDM noise level sigma = t / (1 - t)) and an
optional class label y, with a velocity, a denoised estimate x0, an epsilon estimate or a
score, and samples with the ODE samplers of :mod:`osdlib.samplers`.

Implementations:

* :class:`FlowTeacher` — a velocity network trained by flow matching in chapter 00.
* :class:`DenoiserTeacher` — an EDM-style denoiser D(x, sigma, labels), e.g. an EDM
  checkpoint through :func:`load_edm`.
* :class:`GaussianMixtureTeacher` — the exact (closed-form) teacher of a Gaussian mixture,
  for 2-D toys.
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
        device = next(iter([*self.parameters(), *self.buffers()])).device
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


class GaussianMixtureTeacher(Teacher):
    """The exact teacher of a mixture of isotropic Gaussians: closed-form x0, velocity, score.

    Data x ~ sum_k pi_k N(mu_k, s^2 I). At flow time t, x_t = (1 - t) x + t z given component
    k is N((1 - t) mu_k, v I) with v = (1 - t)^2 s^2 + t^2, so the posterior over components
    is a softmax of log pi_k - ||x_t - (1 - t) mu_k||^2 / (2 v), and
    E[x | x_t, k] = mu_k + (1 - t) s^2 / v (x_t - (1 - t) mu_k). Used on 2-D toys where the
    real score must be exact (chapter 03).
    """

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32)
        w = torch.ones(len(means)) if weights is None else torch.as_tensor(weights).float()
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.log(w / w.sum()))
        self.std = float(std)
        self.shape = tuple(means.shape[1:])

    @classmethod
    def eight_gaussians(cls, radius: float = 4.0, std: float = 0.25) -> GaussianMixtureTeacher:
        """The exact teacher of :func:`osdlib.data.eight_gaussians`."""
        from .data import eight_gaussian_centers

        return cls(eight_gaussian_centers(radius), std)

    def x0(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        tb = t[:, None, None]
        v = (1 - tb) ** 2 * self.std**2 + tb**2  # (B, 1, 1)
        diff = x[:, None, :] - (1 - tb) * self.means[None]  # (B, K, D)
        logits = self.log_weights[None] - diff.pow(2).sum(-1) / (2 * v[:, :, 0])
        post = torch.softmax(logits, dim=1)[:, :, None]  # (B, K, 1)
        mean_k = self.means[None] + (1 - tb) * self.std**2 / v * diff
        return (post * mean_k).sum(1)

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        return paths.x0_to_velocity(self.x0(x, t), x, t.clamp_min(1e-6))


class DenoiserTeacher(Teacher):
    """An EDM-style denoiser ``net(x_sigma, sigma, class_labels)`` (class labels one-hot) as a
    teacher: x0 = D(x_t / (1 - t), t / (1 - t)), v = (x_t - x0) / t. Valid for
    sigma in [sigma_min, sigma_max] (EDM: 0.002 ... 80), i.e. t_max = 80 / 81.

    ``feature_module`` (a submodule name of ``net``, e.g. the last encoder block) makes
    :meth:`features` available, which DMD2's GAN head reads (averaged over space).
    """

    def __init__(
        self,
        net: nn.Module,
        shape: tuple[int, ...],
        num_classes: int | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        feature_module: str | None = None,
    ):
        super().__init__()
        self.net = net
        self.shape = tuple(shape)
        self.num_classes = num_classes or None
        self.t_min = float(paths.sigma_to_t(sigma_min))
        self.t_max = float(paths.sigma_to_t(sigma_max))
        self.feature_module = feature_module

    def _labels(self, y: Tensor | None, n: int, device) -> Tensor | None:
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("this teacher is class-conditional: pass labels y")
        return torch.nn.functional.one_hot(y.to(device).long(), self.num_classes).float()

    def x0(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        t = t.clamp(self.t_min, self.t_max)
        sigma = paths.t_to_sigma(t)
        x_sigma = x / paths._b(1 - t, x)
        return self.net(x_sigma, sigma, self._labels(y, len(x), x.device))

    def velocity(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        return paths.x0_to_velocity(self.x0(x, t, y), x, t.clamp(self.t_min, self.t_max))

    def features(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.feature_module is None:
            raise ValueError("pass feature_module (a submodule name) to read features")
        kept = []
        module = self.net.get_submodule(self.feature_module)
        hook = module.register_forward_hook(lambda m, i, out: kept.append(out))
        try:
            self.velocity(x, t, y)
        finally:
            hook.remove()
        h = kept[0]
        return h.mean(dim=tuple(range(2, h.ndim))) if h.ndim > 2 else h


def load_edm(
    path: str | os.PathLike, device: str = "cpu", feature_module: str | None = None
) -> DenoiserTeacher:
    """An EDM checkpoint (``*.pkl`` with an ``"ema"`` network, e.g. NVIDIA's
    ``edm-imagenet-64x64-cond-adm.pkl``) as a :class:`DenoiserTeacher`.

    The pickle refers to modules of the EDM code (``torch_utils``, ``training``), so that
    code must be importable (clone it and add it to ``sys.path``); the file itself is not
    shipped with this book.
    """
    import pickle

    try:
        with open(path, "rb") as f:
            net = pickle.load(f)["ema"]
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{err}. EDM checkpoints need the EDM code on the Python path "
            "(git clone https://github.com/NVlabs/edm and add it to sys.path)"
        ) from err
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    sigma_min = float(getattr(net, "sigma_min", 0.002))
    sigma_max = float(min(getattr(net, "sigma_max", 80.0), 80.0))
    return (
        DenoiserTeacher(net, shape, net.label_dim, sigma_min, sigma_max, feature_module)
        .to(device)
        .eval()
    )


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
        from .nets import diffusers_unet

        unet = diffusers_unet().from_pretrained(name_or_path, subfolder="unet", **kwargs)
        from diffusers import DDPMScheduler  # after diffusers_unet(): imported quietly there

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
        "image_seconds",  # a wall-clock cap changes what is trained
    )
    spec = {k: settings.get(k) for k in keys}
    if spec["image_seconds"] is not None:  # under a cap, how far training gets: the device
        spec["device"] = torch.device(settings.get("device", "cpu")).type
    return spec


def weights_digest(net: torch.nn.Module) -> str:
    """A short hash of a network's parameters and buffers: which teacher a cached generator
    was distilled from."""
    from .data import digest

    return digest(net.state_dict())


def cached_info(weights: Path, stamp: str, value: str, what: str) -> dict | None:
    """The ``info.json`` beside a cache entry's ``weights``, or None when there are no weights
    or the entry records another ``stamp`` than ``value`` (then it says so). A cache key names
    the settings that made a network; the stamp, what they were applied to (the images, the
    teacher), which the key does not name. Entries without a stamp load."""
    if not weights.exists():
        return None
    info = json.loads((weights.parent / "info.json").read_text())
    if info.get(stamp) not in (None, value):  # None: not recorded
        print(
            f"the cached {what} in {weights.parent} was made from another {stamp} "
            f"({info[stamp]} against {value}): training it again"
        )
        return None
    return info


def cached_digest(settings: dict, root: str | Path | None = None) -> str | None:
    """The :func:`weights_digest` of the chapter-00 teacher cached for ``settings`` (None
    when there is none, or it was cached before teachers recorded it)."""
    info = Path(root or cache_dir()) / "teachers" / _key(teacher_spec(settings)) / "info.json"
    try:
        return json.loads(info.read_text()).get("digest")
    except (OSError, ValueError):
        return None


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
    fingerprint = data.fingerprint()
    info = None if retrain else cached_info(weights, "data", fingerprint, "teacher")
    if info is not None:
        load_weights(net, weights)
        info["trained_now"] = False
    else:
        net, info = flow_matching.train_image_teacher(net, data, settings, progress=progress)
        info |= {"data": fingerprint, "digest": weights_digest(net)}
        save_weights(net, weights)
        (folder / "info.json").write_text(json.dumps({**info, "spec": spec}, indent=1))
        info["trained_now"] = True
    info["path"] = str(weights)
    teacher = FlowTeacher(net, data.shape, data.num_classes).to(device).eval()
    return teacher, info
