"""The book's one-step image generators by name, loaded from the cache or trained when missing.

Chapters 01, 02 and 04 each distil the chapter-00 teacher into a one-step generator; later
chapters (ReNO in 05) use those generators frozen. :func:`get` returns one of
them, ``G(z, y) -> x`` in one network call, trained with the recipe and settings of the
chapter that teaches it (its profile's step counts, times ``scale``; each training run capped
as that chapter caps it, or by ``max_seconds``) and kept in
``$OSD_CACHE_DIR/generators/<kind>-<key>/``. The key covers the teacher's settings, the seed
and every setting of the recipe (with a time cap, the device too), so a different profile or
scale never loads the wrong network, and each entry records a digest of the teacher's weights,
so a teacher trained again under the same settings (other images, changed code) has its
generators made again; it does not make training bit-reproducible (a network
initialised from the global random state, such as DMD2's discriminator head, depends on
what ran before). The chapters that teach a kind store the generator they trained with
:func:`put`, under the key :func:`get` computes for the same recipe: after them at the same
settings (as in the book's chain), chapter 05 loads the networks chapters 01, 02 and 04
made instead of training them again.

=================  ==========  ==========================================================
kind               chapter     recipe
=================  ==========  ==========================================================
``2-rf-distilled`` 01          teacher pairs -> reflow (2-RF) -> distil k = 1 on the pairs
``ect``            02          ECT from the teacher (flow consistency), one step at sigma_max
``dmd2``           04          DMD2: DMD gradient + TTUR + GAN, one step
=================  ==========  ==========================================================
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from . import nets, profiles
from .teachers import _key as teacher_key
from .teachers import cache_dir, cached_digest, cached_info, teacher_spec, weights_digest

KINDS = {
    "2-rf-distilled": ("rectified_flow", "distilled 2-RF (ch. 01)"),
    "ect": ("consistency", "ECT (ch. 02)"),
    "dmd2": ("dmd2", "DMD2 (ch. 04)"),
}

# the settings of each source chapter that change what is trained (the cache key);
# `image_seconds` is that chapter's wall-clock cap on each training run (None: no cap)
_RECIPE_KEYS = {
    "2-rf-distilled": (
        "pairs",
        "pair_steps",
        "reflow_steps",
        "distill_steps",
        "batch",
        "lr",
        "distance",
        "image_seconds",
    ),
    "ect": ("ect_steps", "ect_stages", "ect_lr", "batch", "image_seconds"),
    "dmd2": ("steps", "batch", "lr", "fake_lr", "ttur", "gan_gen", "gan_critic", "image_seconds"),
}
# settings of chapter 01 outside its recipe keys that still change the 2-RF coupling (how
# its pairs are sampled and stored); in the key of ``2-rf-distilled`` and overridable
_COUPLING_KEYS = ("fp16_pairs", "sample_bf16")
_STEP_KEYS = {"pairs", "reflow_steps", "distill_steps", "ect_steps", "steps"}


class OneStep(nn.Module):
    """A one-step generator G(z, y) = x from a velocity net read at t = 1 (2-RF distilled,
    DMD2: x = z - v(z, 1)) or a flow-consistency function at sigma_max (ECT)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown generator {kind!r}; valid kinds are: {', '.join(KINDS)}")
        self.net, self.kind = net, kind

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        from . import paths
        from .methods.consistency import SIGMA_MAX, FlowConsistency

        if self.kind == "ect":
            sigma = torch.full((len(z),), SIGMA_MAX, device=z.device, dtype=z.dtype)
            return FlowConsistency(self.net)(SIGMA_MAX * z, sigma, y)
        t = torch.ones(len(z), device=z.device, dtype=z.dtype)
        return paths.velocity_to_x0(self.net(z, t, y), z, t)


def recipe(kind: str, profile: str, scale: float = 1.0, overrides: dict | None = None) -> dict:
    """The source chapter's settings of ``kind`` at ``profile``, step counts times ``scale``,
    then ``overrides`` (e.g. ``{"batch": 8}`` for a dry run; keys of other kinds are ignored,
    unknown keys are an error)."""
    if kind not in KINDS:
        raise ValueError(f"unknown generator {kind!r}; valid kinds are: {', '.join(KINDS)}")
    known = {k for keys in _RECIPE_KEYS.values() for k in keys} | set(_COUPLING_KEYS)
    unknown = set(overrides or {}) - known
    if unknown:
        raise KeyError(f"unknown recipe setting(s) {sorted(unknown)}; valid: {sorted(known)}")
    out = recipe_of(kind, profiles.resolve(KINDS[kind][0], profile))
    for k in _STEP_KEYS & set(out):
        out[k] = max(1, round(out[k] * scale))
    out.update({k: v for k, v in (overrides or {}).items() if k in out})
    return out


def recipe_of(kind: str, settings: dict) -> dict:
    """The recipe of ``kind`` in a source chapter's resolved ``settings``; under a time cap,
    how far training gets depends on the device, so the recipe names it."""
    out = {k: settings[k] for k in _RECIPE_KEYS[kind]}
    if kind == "2-rf-distilled":  # how the coupling is made and stored
        out.update({k: settings[k] for k in _COUPLING_KEYS})
    if out["image_seconds"] is not None:
        out["device"] = torch.device(settings["device"]).type
    return out


def spec(kind: str, teacher_settings: dict, recipe: dict, seed: int) -> dict:
    """Everything that determines a cached generator: its kind, teacher, recipe and seed."""
    return {
        "kind": kind,
        "teacher": teacher_key(teacher_spec(teacher_settings)),
        "recipe": recipe,
        "seed": seed,
    }


def _folder(s: dict, root) -> Path:
    blob = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root or cache_dir()) / "generators" / f"{s['kind']}-{blob}"


def _store(folder: Path, net: nn.Module, info: dict) -> None:
    """Old weights out first, then the description, then the weights (each file written
    atomically): an entry with weights is complete, whatever interrupted an earlier write."""
    from .train import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generator.safetensors").unlink(missing_ok=True)
    tmp = folder / "info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder / "info.json")
    save_weights(net, folder / "generator.safetensors")  # copies to the CPU


def _net_of(kind: str, run) -> nn.Module:
    """The generator's network in the EMA of a source chapter's last training run."""
    if kind == "2-rf-distilled":
        return run.ema  # the distilled velocity net
    if kind == "ect":
        return run.ema.net  # inside its FlowConsistency
    return run.ema.generator.net  # dmd2: inside the Distiller's Generator


def _info(runs: list) -> dict:
    return {
        "steps": [run.steps for run in runs],
        "train_wall_s": sum(run.wall_s for run in runs),
        "stopped_by_cap": any(run.stopped_early for run in runs),
    }


def put(
    kind: str,
    runs: list,
    settings: dict,
    teacher_settings: dict,
    chapter: str,
    root: str | Path | None = None,
) -> None:
    """Keep the generator a source chapter trained (``runs``: the ``TrainResult`` of each of
    its training runs in order, the last one's EMA holding the generator) under the key of
    the chapter's ``settings``, where :func:`get` finds it for the same recipe. ``chapter``
    names who made it in its ``info``."""
    if kind not in KINDS:
        raise ValueError(f"unknown generator {kind!r}; valid kinds are: {', '.join(KINDS)}")
    s = spec(kind, teacher_settings, recipe_of(kind, settings), settings["seed"])
    info = {**_info(runs), "made_by": chapter, "spec": s}
    info["teacher_digest"] = cached_digest(teacher_settings, root)  # which teacher it came from
    _store(_folder(s, root), _net_of(kind, runs[-1]), info)


def get(
    kind: str,
    teacher,
    teacher_settings: dict,
    images,
    profile: str,
    scale: float = 1.0,
    max_seconds: float | None = None,
    device: str | torch.device = "cpu",
    root: str | Path | None = None,
    retrain: bool = False,
    progress: bool = True,
    overrides: dict | None = None,
) -> tuple[OneStep, dict]:
    """The one-step generator ``kind`` distilled from ``teacher`` (frozen, eval mode, on
    ``device``) and ``info`` (steps, wall time, whether it was trained now and by whom, the
    cache path). ``overrides`` replaces settings of the recipe (see :func:`recipe`);
    ``max_seconds``, when given, caps each training run instead of the source chapter's cap."""
    from .train import load_weights

    r = recipe(kind, profile, scale, overrides)
    if max_seconds is not None:
        r["image_seconds"] = max_seconds
    if r["image_seconds"] is not None:  # where it trains (recipe_of named the profile's)
        r["device"] = torch.device(device).type
    s = spec(kind, teacher_settings, r, teacher_settings.get("seed", 0))
    folder = _folder(s, root)
    weights = folder / "generator.safetensors"
    net = nets.build(teacher_settings["image_net"], images.shape, images.num_classes)
    digest = weights_digest(teacher.net)
    # the key names the teacher's settings; a teacher trained again under them (other images,
    # changed code) is another teacher, and its generators must be made again
    info = None if retrain else cached_info(weights, "teacher_digest", digest, kind)
    if info is not None:
        load_weights(net, weights)
        info["trained_now"] = False
    else:
        net, info = _train(kind, teacher, r, images, s["seed"], device, progress)
        info["made_by"] = f"osdlib.generators ({KINDS[kind][0]} recipe)"
        _store(folder, net, {**info, "spec": s, "teacher_digest": digest})
        info["trained_now"] = True
    info["path"] = str(weights)
    G = OneStep(net, kind).to(device).eval().requires_grad_(False)
    return G, info


def _copy(net: nn.Module) -> nn.Module:
    """A trainable copy on the CPU (train() moves it to the device and back)."""
    return copy.deepcopy(net).cpu().requires_grad_(True)


def _train(kind, teacher, r, images, seed, device, progress) -> tuple[nn.Module, dict]:
    """Train ``kind`` with the source chapter's recipe ``r``; returns (net, info)."""
    from .methods import consistency as cm
    from .methods import rectified_flow as rf
    from .methods import score_distillation as sd

    kw = dict(seed=seed, device=device, ema_decay=0.999, max_seconds=r["image_seconds"])
    kw["progress"] = progress
    runs = []
    if kind == "2-rf-distilled":
        work = Path(tempfile.mkdtemp(prefix="osd-pairs-"))
        try:
            bf16 = {"device": torch.device(device).type, "sample_bf16": r["sample_bf16"]}
            with profiles.sampling(bf16):  # bf16 autocast where the profile samples so
                pairs = rf.generate_pairs(
                    teacher,
                    r["pairs"],
                    work,
                    steps=r["pair_steps"],
                    num_classes=images.num_classes,
                    fp16=r["fp16_pairs"],
                    batch=1000,
                    seed=seed,
                    device=device,
                )
            train_kw = dict(kw, batch=r["batch"], lr=r["lr"])
            runs.append(
                rf.train_reflow(
                    _copy(teacher.net),
                    pairs,
                    steps=r["reflow_steps"],
                    desc="2-RF",
                    **train_kw,
                )
            )
            runs.append(
                rf.train_distill(
                    _copy(runs[0].ema),
                    pairs,
                    steps=r["distill_steps"],
                    k=1,
                    dist=r["distance"],
                    **train_kw,
                )
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    elif kind == "ect":
        f = cm.FlowConsistency(_copy(teacher.net))
        runs.append(
            cm.train_ect(
                f,
                lambda g: images.batch(r["batch"], generator=g),
                r["ect_steps"],
                stages=r["ect_stages"],
                lr=r["ect_lr"],
                **kw,
            )
        )
    else:  # dmd2
        recipe_ = sd.Recipe(gen_every=r["ttur"], gan_gen=r["gan_gen"], gan_critic=r["gan_critic"])
        model = sd.Distiller(
            sd.Generator(_copy(teacher.net)),
            _copy(teacher.net),
            images.shape,
            images.num_classes,
            discriminator=True,
        )
        runs.append(
            sd.distill(
                recipe_,
                teacher,
                model,
                lambda g: images.batch(r["batch"], generator=g),
                r["steps"],
                lr=r["lr"],
                fake_lr=r["fake_lr"],
                desc="DMD2",
                **kw,
            )
        )
    return _net_of(kind, runs[-1]).cpu(), _info(runs)
