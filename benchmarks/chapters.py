"""Throughput of every chapter's image training step and of sampling, at two profiles' sizes.

    python benchmarks/chapters.py              # writes results/benchmarks/chapters-<device>.json
    python benchmarks/chapters.py --quick      # a smoke check at tiny sizes (writes only --out)
    python benchmarks/chapters.py --compile    # also torch.compile variants (GPU; slow to warm up)

What runs is the book's own code, through the osdlib function each chapter calls: the
flow-matching teacher (ch. 00), reflow on a coupling (01), ECT and iCT (02), VSD (03), DMD2
with its GAN head and two time-scale rule (04), one ReNO iteration through a frozen
one-step generator (05), and the AR transformer and the distilled-decoding student (06),
each through ``osdlib.train.train`` (loss, backward, clipping, Adam, EMA; bf16 autocast on
CUDA), plus sampling at NFE 1, 2, 4, ... of the flow teacher, the one- and few-step
generators and the AR model. Every network is built with random weights and every batch is
random and already on the device: nothing needs a data set or a cached teacher, and data
loading is not timed.

Sizes come from ``osdlib.profiles``: the ``book`` profile's (digits, 8x8) and the ``gpu``
profile's (CIFAR-10, 32x32). On a CPU the gpu profile's networks are measured at a smaller
batch (``--cpu-gpu-batch``; each row keeps the profile's own batch as ``profile_batch``).
Side by side in the same run: the book's CIFAR-10 UNet (the gpu profile's teacher) against
torchcfm's CIFAR-10 UNet at the same parameter count, batch, loss and training step
(``pip install torchcfm``; without it the record says so).

Each row: chapter, profile (whose sizes), kind (train | sample | compare), what, network,
params (one copy of that network), params_total (every network the step runs), batch,
images_per_s, ms_per_step (one training step, one ReNO iteration, or one sampling call that
makes ``batch`` images), gflop_per_step (torch.utils.flop_counter: matrix products,
convolutions, attention; optimizer arithmetic is not counted), gflop_per_s and, on a GPU
in the peak table below, mfu = achieved FLOP/s over the card's dense bf16 peak; cpu_share
(this process's CPU time over wall time x threads while timed) and the record's load
averages show whether other work shared a CPU. A row is timed after warm-up calls (the
first one counts the FLOPs); every call stops after the step that passes ``--row-cap``
seconds (``stopped_by_cap`` says so), and no new row starts after ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osdlib import generators, nets, profiles, results  # noqa: E402
from osdlib.autoregressive import ARTransformer, train_ar  # noqa: E402
from osdlib.methods import consistency as cm  # noqa: E402
from osdlib.methods import distilled_decoding as dd  # noqa: E402
from osdlib.methods import flow_matching  # noqa: E402
from osdlib.methods import rectified_flow as rf  # noqa: E402
from osdlib.methods import reno as rn  # noqa: E402
from osdlib.methods import score_distillation as sd  # noqa: E402
from osdlib.teachers import FlowTeacher  # noqa: E402
from osdlib.train import TrainResult  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's data sheets, looked
# up by a piece of torch.cuda.get_device_name(); the first match wins (PCIe/NVL before SXM).
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.4),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
)

DATA_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    low = name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in low), None)


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``): give it the same formulas."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    registry = flop_counter.flop_registry
    if fwd is not None and fwd not in registry:

        @flop_counter.register_flop_formula(fwd)
        def _fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(q, k, v)

    if bwd is not None and bwd not in registry:

        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


_register_cpu_attention_flops()


# --------------------------------------------------------------------------------------
# Sizes: what each chapter trains at a profile
# --------------------------------------------------------------------------------------


def sizes(profile: str, device: torch.device, quick: bool, cpu_gpu_batch: int) -> dict:
    """Every chapter's image network and batches at ``profile`` (from osdlib.profiles).

    On a CPU the gpu profile's batches are capped at ``cpu_gpu_batch``; ``quick`` shrinks
    everything (the gpu profile's UNet becomes the tiny ``unet-ci`` on 8x8 images)."""
    chapters = ("foundations", "rectified_flow", "consistency", "score_distillation", "dmd2")
    chapters += ("reno", "distilled_decoding")
    r = {ch: profiles.resolve(ch, profile) for ch in chapters}
    fo, ct, d2, dec = r["foundations"], r["consistency"], r["dmd2"], r["distilled_decoding"]
    side = DATA_SHAPES[dec.image_data][-1] // dec.downsample
    s = {
        "profile": profile,
        "shape": DATA_SHAPES[fo.image_data],
        "net": fo.image_net,
        "classes": 10,
        "batch": {
            "teacher": fo.image_batch,
            "reflow": r["rectified_flow"].batch,
            "consistency": ct.batch,
            "vsd": r["score_distillation"].batch,
            "dmd2": d2.batch,
            "reno": r["reno"].batch,
            "ar": dec.ar_batch,
            "student": dec.student_batch,
            "sample": min(fo.eval_samples, 1000),  # samplers.in_chunks' chunk
        },
        "lr": {
            "teacher": fo.image_lr,
            "reflow": r["rectified_flow"].lr,
            "ect": ct.ect_lr,
            "ict": ct.lr,
            "vsd": r["score_distillation"].lr,
            "dmd2": d2.lr,
            "dd": dec.lr,
        },
        "nfe": list(fo.nfe_list),
        "sample_bf16": fo.sample_bf16,
        "consistency": {"s0": ct.s0, "s1": ct.s1, "stages": ct.ect_stages, "mid": ct.mid_sigma},
        "dmd2": {
            "ttur": d2.ttur,
            "gan_gen": d2.gan_gen,
            "gan_critic": d2.gan_critic,
            "times": tuple(d2.few_step_times),
        },
        "reno": {
            "lam": r["reno"].lam,
            "scale": r["reno"].intensity_scale,
            "weight": r["reno"].intensity_weight,
        },
        "ar": {
            "codes": dec.codes,
            "code_dim": dec.code_dim,
            "dim": dec.ar_dim,
            "depth": dec.ar_depth,
            "heads": dec.ar_heads,
            "length": side * side,
        },
    }
    s["profile_batch"] = dict(s["batch"])
    limit = None
    if quick:
        limit = 16 if profile == "book" else 2
        s["nfe"] = [1, 2]
        s["dmd2"]["ttur"] = 2  # a shorter cycle
        if profile != "book":
            s["net"], s["shape"] = "unet-ci", (3, 8, 8)
            s["ar"] = {"codes": 16, "code_dim": 4, "dim": 32, "depth": 1, "heads": 2, "length": 16}
    elif device.type == "cpu" and profile != "book":
        limit = cpu_gpu_batch
    if limit is not None:
        s["batch"] = {k: min(v, limit) for k, v in s["batch"].items()}
    return s


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _done(out: object, n: int) -> int:
    """Iterations a ``run(n)`` call did: a TrainResult's steps (``max_seconds`` may stop it
    early), a count, or n."""
    if isinstance(out, TrainResult):
        return out.steps - out.resumed_from
    return out if isinstance(out, int) else n


def measure(
    run: Callable[[int], object],
    device: torch.device,
    unit: int = 1,
    warmup: int = 2,
    seconds: float = 2.0,
    max_iters: int = 500,
    flops: float | None = None,
    baseline: Callable[[], object] | None = None,
    flops_fn: Callable[[], object] | None = None,
) -> dict:
    """Time ``run(n)``, which does n iterations (n a multiple of ``unit``: a DMD2 cycle) or
    fewer when the row's time cap stops it (it returns what :func:`_done` reads).

    ``warmup`` calls of ``run(unit)`` first; the first of them counts the FLOPs per iteration
    unless ``flops`` is given (a compiled variant takes its eager twin's) or ``flops_fn``
    counts one iteration instead; on a CPU, a first call longer than ``4 * seconds`` is
    warm-up enough. Then as many iterations as fill about ``seconds`` (at least ``unit``, at least
    two). ``baseline``: a call whose time is taken off ``run``'s once per call (ReNO's final
    evaluation pass, so that an iteration is exactly one forward and one backward)."""
    t0 = time.perf_counter()
    if flops is None and flops_fn is not None:
        flops = count_flops(flops_fn)
    elif flops is None:
        out = []
        flops = count_flops(lambda: out.append(run(unit))) / _done(out[0], unit)
        warmup -= 1
    sync(device)
    est = (time.perf_counter() - t0) / unit
    if device.type == "cpu" and est * unit > 4 * seconds:
        warmup = 0  # a CPU call this long is warm after one call (no autotuning, no compile)
    for _ in range(max(0, warmup)):
        t = time.perf_counter()
        run(unit)
        sync(device)
        est = (time.perf_counter() - t) / unit
    warmup_s = time.perf_counter() - t0
    base_s = 0.0
    if baseline is not None:
        times = []
        for _ in range(2):
            t = time.perf_counter()
            baseline()
            sync(device)
            times.append(time.perf_counter() - t)
        base_s = min(times)
    n = int(min(max_iters, max(2, seconds / max(est, 1e-9))))
    n = max(unit, -(-n // unit) * unit)
    t, cpu = time.perf_counter(), time.process_time()
    done = _done(run(n), n)
    sync(device)
    wall = time.perf_counter() - t
    dt = max(wall - base_s, 1e-9) / done
    return {
        "iterations": done,
        "stopped_by_cap": done < n,
        # this process's CPU time over wall time x threads in the timed part: well below 1
        # on a CPU when other work shared the cores (or when the step is mostly serial)
        "cpu_share": (time.process_time() - cpu) / (wall * torch.get_num_threads()),
        "ms_per_step": 1e3 * dt,
        "gflop_per_step": flops / 1e9,
        "gflop_per_s": flops / dt / 1e9,
        "warmup_s": warmup_s,
    }


# --------------------------------------------------------------------------------------
# The benchmarks: each builds its networks when it runs (a skipped row builds nothing)
# --------------------------------------------------------------------------------------


@dataclass
class Bench:
    chapter: str
    profile: str
    kind: str  # train | sample | compare
    what: str
    network: str
    batch: int
    profile_batch: int
    build: Callable[[], tuple[Callable[[int], object], dict]]  # -> (run(n), info)
    unit: int = 1
    nfe: int | None = None
    variant: dict = field(default_factory=dict)
    flops_key: tuple | None = None  # rows with the same key share one FLOP count


class FixedBatch:
    """A data set stand-in: the same random batch every call, already on the device
    (``ImageData.batch`` and ``PairSet.batch`` have this signature)."""

    name = "random"

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def batch(self, n: int, generator: torch.Generator | None = None):
        return self.tensors


def _params(*modules: nn.Module) -> int:
    return sum(nets.count_parameters(m) for m in modules)


def train_benches(
    s: dict, device: torch.device, variants: bool, compile_: bool, cap: float
) -> list[Bench]:
    """The chapters' training steps; ``cap``: train()'s ``max_seconds`` for every call."""
    shape, name, classes, p = s["shape"], s["net"], s["classes"], s["profile"]
    b, pb, lr = s["batch"], s["profile_batch"], s["lr"]
    kw = dict(device=device, progress=False, log_every=10**9, max_seconds=cap)

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nets.build(name, shape, classes).to(device)

    def images(n: int, channels_last: bool = False):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, *shape, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, classes, (n,), generator=g).to(device)

    def teacher(channels_last=False, compile_mode=None):
        def build():
            m = net()
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            if compile_mode:
                m.compile(mode=compile_mode)
            data = FixedBatch(*images(b["teacher"], channels_last))
            run = partial(
                flow_matching.train_images, m, data, batch=b["teacher"], lr=lr["teacher"], **kw
            )
            return run, {"params": _params(m), "params_total": _params(m)}

        return build

    def reflow():
        m = net()
        x, y = images(b["reflow"])
        pairs = FixedBatch(x, torch.randn_like(x), y)
        run = partial(rf.train_reflow, m, pairs, batch=b["reflow"], lr=lr["reflow"], **kw)
        return run, {"params": _params(m), "params_total": _params(m)}

    def ect():
        f = cm.FlowConsistency(net())
        batch = images(b["consistency"])
        c = s["consistency"]
        run = partial(cm.train_ect, f, lambda g: batch, stages=c["stages"], lr=lr["ect"], **kw)
        return run, {"params": _params(f), "params_total": _params(f)}

    def ict():
        f = cm.ConsistencyModel(net())
        batch = images(b["consistency"])
        c = s["consistency"]
        run = partial(cm.train_ict, f, lambda g: batch, s0=c["s0"], s1=c["s1"], lr=lr["ict"], **kw)
        return run, {"params": _params(f), "params_total": _params(f)}

    def distiller(recipe: sd.Recipe, key: str, gan: bool):
        def build():
            t = net()
            real = FlowTeacher(t, shape, classes).eval().requires_grad_(False)
            model = sd.Distiller(
                sd.Generator(copy.deepcopy(t)), copy.deepcopy(t), shape, classes, gan
            )
            batch = images(b[key])
            run = partial(sd.distill, recipe, real, model, lambda g: batch, lr=lr[key], **kw)
            return run, {"params": _params(t), "params_total": _params(real, model)}

        return build

    def reno():
        torch.manual_seed(0)
        G = generators.OneStep(net(), "dmd2").eval().requires_grad_(False)
        clf = nets.SmallClassifier(shape[0], classes).to(device).eval()
        r = s["reno"]
        task = [(rn.ClassLogProb(clf), 1.0), (rn.MeanIntensity(0.3, r["scale"]), r["weight"])]
        z, y = images(b["reno"])
        lr_, clip = rn.scaled_step(z[0].numel())
        kw_ = dict(lr=lr_, clip=clip, lam=r["lam"])

        def run(n: int):  # n iterations: n + 1 forward passes, the last one evaluated only
            return rn.reno(G, z, y, task, steps=n + 1, **kw_)

        baseline = partial(rn.reno, G, z, y, task, steps=1, **kw_)

        def one_iteration():
            # the FLOPs of one iteration, counted on the same loss with .backward():
            # FlopCounterMode's module tracker cannot follow reno's torch.autograd.grad
            leaf = z.clone().requires_grad_(True)
            total, _ = rn.weighted_reward(G(leaf, y), y, task)
            (-total.sum() + r["lam"] * rn.noise_nll(leaf).sum()).backward()

        info = {"params": _params(G), "params_total": _params(G, clf)}
        return run, info | {"baseline": baseline, "flops_fn": one_iteration}

    a = s["ar"]

    def ar_model() -> ARTransformer:
        torch.manual_seed(0)
        return ARTransformer(a["codes"], a["length"], classes, a["dim"], a["depth"], a["heads"])

    def tokens(n: int):
        g = torch.Generator().manual_seed(2)
        t = torch.randint(0, a["codes"], (n, a["length"]), generator=g).to(device)
        return t, torch.randint(0, classes, (n,), generator=g).to(device)

    def ar():
        m = ar_model().to(device)
        t, y = tokens(b["ar"])
        run = partial(train_ar, m, t, y, batch=b["ar"], lr=lr["dd"], **kw)
        return run, {"params": _params(m), "params_total": _params(m)}

    def student():
        st = dd.Student(ar_model(), a["code_dim"]).to(device)
        t, y = tokens(b["student"])
        eps = torch.randn(len(t), a["length"], a["code_dim"], device=device)
        pairs = FixedBatch(t.float(), eps, y)
        run = partial(dd.train_student, st, pairs, batch=b["student"], lr=lr["dd"], **kw)
        return run, {"params": _params(st), "params_total": _params(st)}

    d2 = s["dmd2"]
    ar_name = f"AR transformer (dim {a['dim']}, depth {a['depth']}, {a['length']} tokens)"

    def row(ch, what, network, key, build, **extra):
        return Bench(ch, p, "train", what, network, b[key], pb[key], build, **extra)

    rows = [
        row("00", "flow matching (teacher)", name, "teacher", teacher(), flops_key=(p, "00")),
        row("01", "reflow: flow matching on (z, x) pairs", name, "reflow", reflow),
        row("02", "ECT step (flow consistency, from the teacher)", name, "consistency", ect),
        row("02", "iCT step (consistency model, from scratch)", name, "consistency", ict),
        row(
            "03",
            "VSD: generator + fake-score step (frozen teacher)",
            f"{name} x3",
            "vsd",
            distiller(sd.Recipe(weighting="vsd"), "vsd", False),
        ),
        row(
            "04",
            f"DMD2 iteration: TTUR {d2['ttur']}:1, GAN head (mean over a cycle)",
            f"{name} x3 + head",
            "dmd2",
            distiller(
                sd.Recipe(gen_every=d2["ttur"], gan_gen=d2["gan_gen"], gan_critic=d2["gan_critic"]),
                "dmd2",
                True,
            ),
            unit=d2["ttur"],
        ),
        row(
            "05",
            "ReNO iteration: reward + backward through the frozen generator, SGD on z",
            f"{name} + SmallClassifier",
            "reno",
            reno,
        ),
        row("06", "AR transformer: next-token step (images = sequences)", ar_name, "ar", ar),
        row(
            "06",
            "distilled-decoding student step",
            f"DD student on the {ar_name}",
            "student",
            student,
        ),
    ]
    if variants and len(shape) == 3 and name.startswith("unet"):
        rows.append(
            row(
                "00",
                "flow matching (teacher), channels_last",
                name,
                "teacher",
                teacher(channels_last=True),
                variant={"channels_last": True},
                flops_key=(p, "00"),
            )
        )
    if compile_:
        rows.append(
            row(
                "00",
                "flow matching (teacher), torch.compile",
                name,
                "teacher",
                teacher(compile_mode="default"),
                variant={"compile": "default"},
                flops_key=(p, "00"),
            )
        )
    return rows


def sample_benches(
    s: dict, device: torch.device, variants: bool, compile_: bool, cap: float
) -> list[Bench]:
    """Sampling: ``batch`` images per call; a call that starts after ``cap`` s is not made."""
    shape, name, classes, p = s["shape"], s["net"], s["classes"], s["profile"]
    b, pb = s["batch"]["sample"], s["profile_batch"]["sample"]
    cuda = device.type == "cuda"

    def inputs():
        g = torch.Generator().manual_seed(3)
        z = torch.randn(b, *shape, generator=g).to(device)
        return z, torch.randint(0, classes, (b,), generator=g).to(device)

    def net(compile_mode=None) -> nn.Module:
        torch.manual_seed(0)
        m = nets.build(name, shape, classes).to(device).eval().requires_grad_(False)
        if compile_mode:
            m.compile(mode=compile_mode)
        return m

    def ctx(bf16: bool):
        return profiles.sampling({"sample_bf16": bf16, "device": device.type})

    def looped(fn, bf16):
        def run(n):
            t0 = time.perf_counter()
            with ctx(bf16), torch.no_grad():
                for i in range(n):
                    if i and time.perf_counter() - t0 > cap:
                        return i
                    fn()
            return n

        return run

    def teacher(k: int, bf16: bool, compile_mode=None):
        def build():
            t = FlowTeacher(net(compile_mode), shape, classes).eval()
            z, y = inputs()
            fn = partial(t.sample, b, steps=k, y=y, z=z)
            return looped(fn, bf16), {"params": _params(t), "params_total": _params(t)}

        return build

    def one_step(kind: str, bf16: bool):
        def build():
            z, y = inputs()
            if kind == "consistency-2":
                f = cm.FlowConsistency(net())
                sigmas = (cm.SIGMA_MAX, s["consistency"]["mid"])
                fn = partial(cm.sample, f, z, sigmas, y)
            elif kind == "dmd2-4":
                f = sd.Generator(net(), s["dmd2"]["times"])
                fn = partial(f.sample, z, y)
            else:
                f = generators.OneStep(net(), kind)
                fn = partial(f, z, y)
            return looped(fn, bf16), {"params": _params(f), "params_total": _params(f)}

        return build

    a = s["ar"]

    def ar_build(student_steps: int | None):
        def build():
            torch.manual_seed(0)
            ar = ARTransformer(a["codes"], a["length"], classes, a["dim"], a["depth"], a["heads"])
            ar = ar.to(device).eval()
            y = torch.arange(b, device=device) % classes
            if student_steps is None:
                fn = partial(ar.generate, y)
                m = ar
            else:
                m = dd.Student(ar, a["code_dim"]).to(device).eval()
                eps = torch.randn(b, a["length"], a["code_dim"], device=device)
                fn = partial(m.sample, eps, y, steps=student_steps)
            return looped(fn, False), {"params": _params(m), "params_total": _params(m)}

        return build

    default_bf16 = bool(s["sample_bf16"]) and cuda
    precisions = [default_bf16] + ([not default_bf16] if cuda and variants else [])
    rows = []
    for bf16 in precisions:
        v = {"bf16": bf16} if cuda else {}
        for k in s["nfe"]:
            rows.append(
                Bench(
                    "00",
                    p,
                    "sample",
                    f"flow teacher: Euler, {k} step{'s' if k > 1 else ''}",
                    name,
                    b,
                    pb,
                    teacher(k, bf16),
                    nfe=k,
                    variant=v,
                    flops_key=(p, "teacher", k),
                )
            )
        for ch, what, kind, k in (
            ("01", "one-step generator G(z) = z - v(z, 1) (distilled 2-RF, DMD2)", "dmd2", 1),
            ("02", "consistency model: 2-step sampling", "consistency-2", 2),
            ("04", "DMD2 few-step generator: 4 steps", "dmd2-4", 4),
        ):
            rows.append(
                Bench(ch, p, "sample", what, name, b, pb, one_step(kind, bf16), nfe=k, variant=v)
            )
    ar_name = f"AR transformer (dim {a['dim']}, depth {a['depth']}, {a['length']} tokens)"
    rows += [
        Bench(
            "06",
            p,
            "sample",
            "AR teacher: token by token (KV cache)",
            ar_name,
            b,
            pb,
            ar_build(None),
            nfe=a["length"],
        ),
        Bench("06", p, "sample", "DD student: 1 step", ar_name, b, pb, ar_build(1), nfe=1),
        Bench("06", p, "sample", "DD student: 2 steps", ar_name, b, pb, ar_build(2), nfe=2),
    ]
    if compile_:
        for k in (1, 8):
            rows.append(
                Bench(
                    "00",
                    p,
                    "sample",
                    f"flow teacher: Euler, {k} step{'s' if k > 1 else ''}, torch.compile",
                    name,
                    b,
                    pb,
                    teacher(k, default_bf16, "reduce-overhead"),
                    nfe=k,
                    variant={"bf16": default_bf16, "compile": "reduce-overhead"},
                    flops_key=(p, "teacher", k),
                )
            )
    return rows


# --------------------------------------------------------------------------------------
# The book's CIFAR-10 UNet against torchcfm's
# --------------------------------------------------------------------------------------


class TorchCFMNet(nn.Module):
    """torchcfm's UNet (``forward(t, x, y)``, t in [0, 1] as torchcfm trains it) behind the
    book's ``net(x, t, y)`` interface."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(t, x, y)


def torchcfm_config(shape: tuple[int, ...], target: int, classes: int) -> dict:
    """The UNetModelWrapper settings of torchcfm's examples/images/cifar10 training script
    (channel_mult 1,2,2,2; 4 heads of 64 channels; attention at 16x16; dropout 0.1), class-
    conditional like the book's teacher, with num_channels (multiples of 32, its GroupNorm's
    groups) and num_res_blocks chosen to match ``target`` parameters: two res blocks, as in
    the script, when that comes within 10%."""
    from torchcfm.models.unet.unet import UNetModelWrapper

    base = dict(
        dim=tuple(shape),
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
        class_cond=True,
        num_classes=classes,
    )
    best = None
    for blocks in (2, 1, 3):
        for ch in range(32, 257, 32):
            try:
                with torch.device("meta"):  # counts parameters without allocating them
                    n = nets.count_parameters(
                        UNetModelWrapper(num_channels=ch, num_res_blocks=blocks, **base)
                    )
            except (AssertionError, ValueError):  # channels its attention heads cannot split
                continue
            off = abs(n / target - 1)
            score = (off > 0.1, blocks != 2, off)
            if best is None or score < best[0]:
                best = (score, dict(base, num_channels=ch, num_res_blocks=blocks))
    return best[1]


def compare(
    s: dict, device: torch.device, seconds: float, warmup: int, quick: bool, cap: float
) -> dict:
    """images/s of the same flow-matching training step (train_images: loss, backward, clip,
    Adam, EMA) with the book's teacher UNet and with torchcfm's, measured book, torchcfm,
    torchcfm, book (a linear drift of a shared machine's speed cancels; ``quick``: book,
    torchcfm); each side's mean is reported."""
    shape, classes, batch = s["shape"], s["classes"], s["batch"]["teacher"]
    try:
        import torchcfm
        from torchcfm.models.unet.unet import UNetModelWrapper
    except ImportError as err:
        return {"error": f"torchcfm is not importable ({err}); pip install torchcfm"}
    torch.manual_seed(0)
    book = nets.build(s["net"], shape, classes).to(device)
    config = torchcfm_config(shape, nets.count_parameters(book), classes)
    torch.manual_seed(0)
    theirs = TorchCFMNet(UNetModelWrapper(**config)).to(device)
    g = torch.Generator().manual_seed(1)
    data = FixedBatch(
        torch.randn(batch, *shape, generator=g).to(device),
        torch.randint(0, classes, (batch,), generator=g).to(device),
    )
    lr = s["lr"]["teacher"]
    kw = dict(batch=batch, lr=lr, device=device, progress=False, log_every=10**9, max_seconds=cap)

    def runner(m):
        return partial(flow_matching.train_images, m, data, **kw)

    runs: dict[str, list[dict]] = {"book": [], "torchcfm": []}
    flops: dict[str, float | None] = {"book": None, "torchcfm": None}
    for side in ("book", "torchcfm") if quick else ("book", "torchcfm", "torchcfm", "book"):
        m = book if side == "book" else theirs
        r = measure(runner(m), device, warmup=warmup, seconds=seconds, flops=flops[side])
        flops[side] = r["gflop_per_step"] * 1e9
        runs[side].append(r)
    out = {"batch": batch, "profile_batch": s["profile_batch"]["teacher"], "runs": runs}
    for side, m in (("book", book), ("torchcfm", theirs)):
        ms = sum(r["ms_per_step"] for r in runs[side]) / len(runs[side])
        out[side] = {
            "params": nets.count_parameters(m),
            "ms_per_step": ms,
            "images_per_s": batch / (ms / 1e3),
            "gflop_per_step": runs[side][0]["gflop_per_step"],
            "gflop_per_s": runs[side][0]["gflop_per_step"] / (ms / 1e3),
        }
    out["book"]["network"] = f"{s['net']} (diffusers UNet2DModel)"
    out["torchcfm"]["network"] = "torchcfm UNetModelWrapper"
    out["torchcfm"]["config"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
    }
    out["torchcfm"]["version"] = getattr(torchcfm, "__version__", "unknown")
    out["ratio_book_over_torchcfm"] = out["book"]["images_per_s"] / out["torchcfm"]["images_per_s"]
    out["params_ratio"] = out["torchcfm"]["params"] / out["book"]["params"]
    return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def device_model(device: torch.device) -> str:
    """The processor's name: the GPU's, or the CPU's (as every record's ``cpu`` says it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return results.cpu_info()["model"]


def _loadavg() -> float | None:
    """The 1-minute load average (other work on the machine shows up here), where known."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def markdown(record: dict) -> str:
    """A short summary: one table of the rows, the comparison, what was skipped."""
    peak = record.get("peak_bf16_tflops")
    lines = [
        f"Device: {record['device_model']} ({record['device']}), torch {record['torch']}, "
        f"{record['cpu_threads']} CPU threads, commit {record['commit'][:12]}",
        "",
        "| ch | profile | kind | what | network | params | batch | images/s | ms/step | GFLOP/s"
        + (" | MFU |" if peak else " |"),
        "|---|---|---|---|---|---:|---:|---:|---:|---:" + ("|---:|" if peak else "|"),
    ]
    m = record["metrics"]
    for r in m["rows"]:
        what = r["what"] + (f" [{r['precision']}]" if record["device"] != "cpu" else "")
        batch = f"{r['batch']}" + (
            f" ({r['profile_batch']})" if r.get("profile_batch") != r["batch"] else ""
        )
        if "error" in r:
            nums = f"error: {r['error'][:80]} | | "
        else:
            nums = f"{r['images_per_s']:,.1f} | {r['ms_per_step']:,.2f} | {r['gflop_per_s']:,.1f}"
        mfu = ""
        if peak:
            mfu = f" | {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else " | "
        lines.append(
            f"| {r['chapter']} | {r['profile']} | {r['kind']} | {what} | {r['network']} "
            f"| {r.get('params', 0):,} | {batch} | {nums}{mfu} |"
        )
    lines.append("")
    lines.append("batch (n): measured at n, the profile's own batch in brackets.")
    c = m.get("comparison")
    if c and "error" not in c:
        lines.append(
            f"Book UNet vs torchcfm UNet (flow-matching training step, batch {c['batch']}): "
            f"{c['book']['images_per_s']:,.1f} vs {c['torchcfm']['images_per_s']:,.1f} images/s, "
            f"ratio {c['ratio_book_over_torchcfm']:.2f}; params {c['book']['params']:,} vs "
            f"{c['torchcfm']['params']:,} (num_channels {c['torchcfm']['config']['num_channels']}, "
            f"num_res_blocks {c['torchcfm']['config']['num_res_blocks']})"
        )
    elif c:
        lines.append(f"Book UNet vs torchcfm UNet: not measured ({c['error']})")
    if m["skipped"]:
        lines.append(
            f"Skipped by the {record['deadline_s']:.0f} s deadline: {len(m['skipped'])} rows"
        )
    load = record["loadavg_1min"]
    lines.append(
        f"Wall time {record['wall_s']:.0f} s; 1-minute load average {load['before']} before, "
        f"{load['after']} after."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        help="the JSON record (default results/benchmarks/chapters-<device>.json;"
        " --quick writes only where --out says)",
    )
    p.add_argument("--deadline", type=float, default=300.0, help="seconds; no new row after")
    p.add_argument(
        "--row-cap",
        type=float,
        default=45.0,
        help="seconds: a call of a row stops after the step that passes it (train's max_seconds)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check of every row")
    p.add_argument("--profiles", default="book,gpu", help="whose sizes (comma-separated)")
    p.add_argument("--chapters", default="", help="only these chapters, e.g. 00,04 (default all)")
    p.add_argument("--no-sampling", action="store_true", help="training rows only")
    p.add_argument("--no-compare", action="store_true", help="skip the torchcfm comparison")
    p.add_argument(
        "--variants",
        action="store_true",
        help="channels_last (and fp32/bf16 sampling) rows also on a CPU (on by default on CUDA)",
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile variants")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per row (default 2 on CUDA, 1.5 on a CPU, 0.02 with --quick)",
    )
    p.add_argument(
        "--cpu-gpu-batch",
        type=int,
        default=8,
        help="on a CPU, measure the gpu profile's networks at this batch",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    seconds = args.seconds or (0.02 if args.quick else 2.0 if cuda else 1.5)
    warmup = 1 if args.quick else 3 if cuda else 2
    variants = cuda or args.variants
    model = device_model(device)
    peak = peak_tflops(model) if cuda else None
    wanted = [x.strip() for x in args.profiles.split(",") if x.strip()]
    for name in wanted:
        profiles.pick(name)  # an unknown name lists the valid ones
    # the device's own profile first: its rows matter most when the deadline cuts the run
    own = "gpu" if cuda else "book"
    order = sorted(wanted, key=lambda n: n != own)
    chapters = {c.strip() for c in args.chapters.split(",") if c.strip()}

    start, load_before = time.perf_counter(), _loadavg()
    rows, skipped, flops_cache = [], [], {}
    comparison = None
    plan: list[Bench | str] = []
    for name in order:
        s = sizes(name, device, args.quick, args.cpu_gpu_batch)
        plan += train_benches(s, device, variants, args.compile, args.row_cap)
        if not args.no_sampling:
            plan += sample_benches(s, device, variants, args.compile, args.row_cap)
        if name != "book" and not args.no_compare and (not chapters or "00" in chapters):
            plan.append(name)  # the torchcfm comparison at these sizes
    for item in plan:
        late = time.perf_counter() - start > args.deadline
        if isinstance(item, str):
            if late:
                skipped.append({"kind": "compare", "profile": item})
                continue
            print(f"[{time.perf_counter() - start:5.0f} s] book UNet vs torchcfm UNet", flush=True)
            s = sizes(item, device, args.quick, args.cpu_gpu_batch)
            try:
                comparison = compare(s, device, seconds, warmup, args.quick, args.row_cap)
            except Exception as err:  # reported; the rest of the record stands
                comparison = {"error": f"{type(err).__name__}: {err}"[:300]}
            comparison["profile"] = item
            print(json.dumps({k: v for k, v in comparison.items() if k != "runs"}), flush=True)
            continue
        if chapters and item.chapter not in chapters:
            continue
        head = {
            "chapter": item.chapter,
            "profile": item.profile,
            "kind": item.kind,
            "what": item.what,
            "network": item.network,
        }
        if late:
            skipped.append(head)
            continue
        print(
            f"[{time.perf_counter() - start:5.0f} s] {item.chapter} {item.profile} {item.what}",
            flush=True,
        )
        t_row = time.perf_counter()
        row = dict(head, batch=item.batch, profile_batch=item.profile_batch)
        if item.nfe is not None:
            row["nfe"] = item.nfe
        row["precision"] = (
            ("bf16 autocast" if item.variant.get("bf16", True) else "fp32 (TF32 where enabled)")
            if cuda
            else "fp32"
        )
        row.update({k: v for k, v in item.variant.items() if k != "bf16"})
        try:
            run, info = item.build()
            baseline = info.pop("baseline", None)
            flops_fn = info.pop("flops_fn", None)
            row.update(info)
            r = measure(
                run,
                device,
                unit=item.unit,
                warmup=warmup,
                seconds=seconds,
                flops=flops_cache.get(item.flops_key) if item.flops_key else None,
                baseline=baseline,
                flops_fn=flops_fn,
            )
            if item.flops_key:
                flops_cache.setdefault(item.flops_key, r["gflop_per_step"] * 1e9)
            r["images_per_s"] = item.batch / (r["ms_per_step"] / 1e3)
            r["mfu"] = r["gflop_per_s"] / (peak * 1e3) if peak else None
            row.update(r)
        except Exception as err:  # a row that fails is reported, the others go on
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        row["row_s"] = time.perf_counter() - t_row
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    record = results.benchmark_record(
        "chapters",
        order,  # the profiles whose sizes were measured
        results.device_name(device),
        {"rows": rows, "comparison": comparison, "skipped": skipped},
        time.perf_counter() - start,
        device_model=model,
        cpu_threads=torch.get_num_threads(),
        quick=args.quick,
        cpu_gpu_batch=None if cuda else args.cpu_gpu_batch,
        seconds_per_row=seconds,
        peak_bf16_tflops=peak,
        tf32=bool(cuda and torch.backends.cuda.matmul.allow_tf32),
        deadline_s=args.deadline,
        loadavg_1min={"before": load_before, "after": _loadavg()},
    )
    out = args.out
    if out is None and not args.quick:
        out = results.results_dir() / "benchmarks" / f"chapters-{record['device']}.json"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(markdown(record))
    if out:
        print(f"\nwrote {Path(out).name}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
