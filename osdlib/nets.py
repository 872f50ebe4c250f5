"""Networks. Every generator/denoiser here has the signature ``net(x, t, y=None)``:

* ``x``: a batch of points or images, ``t``: flow time in [0, 1], shape (B,),
* ``y``: optional integer class labels, shape (B,),

and returns a tensor shaped like ``x`` (a velocity for flow models).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (frozen ones, e.g. of an EMA copy, included)."""
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of ``t`` (scaled by 1000 so that t in [0, 1] spans many periods)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeMLP(nn.Module):
    """A time- (and optionally class-) conditioned MLP on vectors or flattened images.

    ``shape`` is the per-sample shape, e.g. ``(2,)`` for 2-D toys or ``(1, 8, 8)`` for digits.
    """

    def __init__(
        self,
        shape: tuple[int, ...] = (2,),
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.num_classes = num_classes
        dim = math.prod(self.shape)
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth - 1)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def features(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The last hidden layer (B, hidden): the "bottleneck" a GAN head can read."""
        h = self.inp(x.reshape(len(x), -1))
        cond = self.time(timestep_embedding(t.reshape(-1).expand(len(x)), self.time_dim))
        if self.label is not None:
            if y is None:
                raise ValueError("this network is class-conditional: pass labels y")
            cond = cond + self.label(y)
        h = h + cond
        for block in self.blocks:
            h = h + block(h + cond)
        return h

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.out(self.features(x, t, y)).reshape(x.shape)


class Ensemble(nn.Module):
    """``n`` independently initialised copies of one network, run as one network: a batch
    of ``n * B`` rows is split into ``n`` consecutive parts and part ``i`` goes through copy
    ``i``. The copies are vectorised (``torch.func.vmap``), so on a CPU a few small 2-D
    networks train in about the time of one: the book's way to report several training
    seeds of a toy run. Methods need no change: every loss that is a mean over the batch is
    the mean of the members' losses, whose gradients (scaled by 1/n, which Adam ignores)
    reach each member alone; nothing may mix rows across members (a shared normalisation, a
    gradient-norm clip over all parameters).

    ``forward`` and ``features`` take the member network's arguments; every tensor whose
    first dimension equals the first argument's is split, the rest is shared."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        import copy

        if len(members) < 1:
            raise ValueError("an Ensemble needs at least one member")
        self.members = len(members)
        params, buffers = torch.func.stack_module_state(members)
        if buffers:
            raise ValueError("Ensemble members must not have buffers")
        self.params = nn.ParameterDict(
            {k.replace(".", "__"): nn.Parameter(v) for k, v in params.items()}
        )
        base = copy.deepcopy(members[0]).to("meta")
        object.__setattr__(self, "_base", base)  # a template, not a submodule

    def _params(self) -> dict[str, Tensor]:
        return {k.replace("__", "."): v for k, v in self.params.items()}

    def _vmapped(self, method: str, *args):
        n = self.members
        total = len(args[0])
        if total % n:
            raise ValueError(f"a batch of {total} rows does not split into {n} members")
        dims = tuple(
            0 if isinstance(a, Tensor) and a.dim() > 0 and len(a) == total else None for a in args
        )
        split = [
            a.reshape(n, total // n, *a.shape[1:]) if d == 0 else a for a, d in zip(args, dims)
        ]
        # functional_call reaches forward only: another method goes through a _Method wrapper
        target = self._base if method == "forward" else _Method(self._base, method)
        prefix = "" if method == "forward" else "m."

        def one(params, *a):
            return torch.func.functional_call(target, {prefix + k: v for k, v in params.items()}, a)

        out = torch.func.vmap(one, in_dims=(0, *dims))(self._params(), *split)
        return out.reshape(total, *out.shape[2:])

    def forward(self, *args):
        return self._vmapped("forward", *args)

    def features(self, *args):
        return self._vmapped("features", *args)

    def member(self, i: int) -> nn.Module:
        """Copy ``i`` as a plain network (for pictures or further use)."""
        import copy

        net = copy.deepcopy(self._base).to_empty(device=next(iter(self.params.values())).device)
        net.load_state_dict({k: v[i].detach().clone() for k, v in self._params().items()})
        return net


class _Method(nn.Module):
    """Calls ``m.<method>`` as forward (so that ``functional_call`` can reach it)."""

    def __init__(self, m: nn.Module, method: str) -> None:
        super().__init__()
        self.m, self.method = m, method

    def forward(self, *args):
        return getattr(self.m, self.method)(*args)


def split_members(x: Tensor, members: int) -> list[Tensor]:
    """The rows of each member of an :class:`Ensemble` output (``members`` equal parts)."""
    return list(x.reshape(members, -1, *x.shape[1:]).unbind(0))


def quiet_import(module: str):
    """Import a Hugging Face package (diffusers, transformers) without the warning that
    tqdm.auto prints in a notebook without ipywidgets (it would land in every stored output,
    with a file path)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        return importlib.import_module(module)


def diffusers_unet():
    """diffusers' ``UNet2DModel`` (imported quietly, see :func:`quiet_import`)."""
    return quiet_import("diffusers").UNet2DModel


class UNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the ``net(x, t, y)`` interface.

    Flow time t in [0, 1] is passed to the UNet as ``1000 * t`` (its sinusoidal embedding
    expects DDPM-like timestep magnitudes). Class labels use ``num_class_embeds``.
    """

    def __init__(self, **config) -> None:
        super().__init__()
        UNet2DModel = diffusers_unet()
        self.unet = UNet2DModel(**config)
        self.num_classes = config.get("num_class_embeds")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes and y is None:
            raise ValueError("this network is class-conditional: pass labels y")
        t = (1000.0 * t.reshape(-1)).expand(len(x))
        return self.unet(x, t, class_labels=y if self.num_classes else None).sample

    def features(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The bottleneck (the mid block's output), averaged over space: (B, channels).

        The whole network runs (the decoder's output is discarded); simple rather than fast.
        """
        kept = []
        hook = self.unet.mid_block.register_forward_hook(lambda m, i, out: kept.append(out))
        try:
            self(x, t, y)
        finally:
            hook.remove()
        return kept[0].mean(dim=(2, 3))


# UNet presets. "cifar" follows the DDPM CIFAR-10 model (35.7M parameters, attention at 16x16);
# "digits" and "ci" are small versions of the same shape for 8x8 / 16x16 inputs on a CPU.
UNET_PRESETS: dict[str, dict] = {
    "ci": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    "digits": dict(
        block_out_channels=(64, 128),
        layers_per_block=2,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    "cifar-small": dict(  # a SlimFlow-sized student, about a quarter of "cifar"
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=2,
        dropout=0.1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "cifar-fast": dict(  # the `gpu` profile's teacher: the shape of "cifar-small", no dropout
        # (9M parameters; a run of a few minutes sees CIFAR-10 a few dozen times and does not
        # overfit, while a 4x smaller network trains 4x more steps in the same minutes)
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "cifar-tiny": dict(  # a SlimFlow student of "cifar-fast", about a quarter of its size
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "cifar": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        dropout=0.1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}

NETS = (
    "mlp-2d",
    "mlp-digits",
    "mlp-digits-small",
    "unet-ci",
    "unet-digits",
    "unet-cifar",
    "unet-cifar-small",
    "unet-cifar-fast",
    "unet-cifar-tiny",
)


def build(
    name: str, shape: tuple[int, ...], num_classes: int | None = None, hidden: int | None = None
) -> nn.Module:
    """A network by preset name for samples of ``shape`` (C, H, W) or (D,)."""
    if name == "mlp-2d":
        return TimeMLP(shape, hidden=hidden or 256, depth=4, num_classes=num_classes)
    if name == "mlp-digits-small":
        return TimeMLP(shape, hidden=hidden or 192, depth=3, time_dim=128, num_classes=num_classes)
    if name == "mlp-digits":
        return TimeMLP(shape, hidden=hidden or 512, depth=3, time_dim=128, num_classes=num_classes)
    if name.startswith("unet-") and name[5:] in UNET_PRESETS:
        channels, size = shape[0], shape[-1]
        return UNet(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=num_classes,
            **UNET_PRESETS[name[5:]],
        )
    raise ValueError(f"unknown network {name!r}; valid names are: {', '.join(NETS)}")


class SmallClassifier(nn.Module):
    """A small conv classifier; its penultimate features define the proxy distance.

    Used by :mod:`osdlib.metrics` for the offline proxy (not FID) and for class accuracy.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128
    ) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class MLPClassifier(nn.Module):
    """A classifier of another kind than :class:`SmallClassifier`: an MLP on the flattened
    image. ReNO's chapter uses it as a held-out judge that is never optimised against."""

    def __init__(self, shape: tuple[int, ...], num_classes: int = 10, hidden: int = 512) -> None:
        super().__init__()
        d = 1
        for n in shape:
            d *= n
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, hidden),
            nn.SiLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
