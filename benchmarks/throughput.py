"""Throughput of the book's image networks: training steps and sampling, by batch size.

    python benchmarks/throughput.py --out results/benchmarks/throughput-<device>.json

Each measurement times the book's own code (flow-matching loss, the shared training step
with Adam, EMA and bf16 autocast on CUDA; Euler sampling forward passes; FID feature
extraction) after warm-up steps, and stops starting new measurements at ``--deadline``
seconds. The numbers size the gpu profile: on a GPU whose kernel launches are slow, a step's
time hardly grows with the batch until the arithmetic catches up, so images/s grow with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osdlib import metrics, nets, results  # noqa: E402
from osdlib.methods import flow_matching  # noqa: E402
from osdlib.train import EMA  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_rate(net_name, batch, device, steps, warmup, channels_last=False, compile_mode=None):
    """Images/s of the teacher's training step (loss, backward, clip, Adam, EMA)."""
    torch.manual_seed(0)
    net = nets.build(net_name, (3, 32, 32), 10).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ema = EMA(net, 0.999)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.Generator(device).manual_seed(0)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def step(i):
        with amp:
            loss = flow_matching.loss(model, x, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, i)
        return loss.item()  # the training loop reads the loss every step

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / steps
    return {"ms_per_step": 1000 * dt, "images_per_s": batch / dt, "warmup_s": first}


@torch.no_grad()
def sample_rate(net_name, batch, device, calls, bf16, compile_mode=None):
    """Network evaluations per second of a sampler's forward pass (one Euler step each)."""
    torch.manual_seed(0)
    net = nets.build(net_name, (3, 32, 32), 10).to(device).eval()
    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    t = torch.full((batch,), 0.5, device=device)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=bf16 and device.type == "cuda")
    t0 = time.perf_counter()
    with amp:
        for _ in range(2):
            x = x - 0.01 * model(x, t, y).float()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with amp:
        for _ in range(calls):
            x = x - 0.01 * model(x, t, y).float()
    sync()
    dt = (time.perf_counter() - t0) / calls
    return {"ms_per_call": 1000 * dt, "images_per_s": batch / dt, "warmup_s": first}


def fid_rate(n, device):
    """Seconds of an FID of n random uint8 images against a cached reference of n images."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    t0 = time.perf_counter()
    metrics.fid(a, b, device=device, cache_name=f"bench-{n}")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.fid(a, b, device=device, cache_name=f"bench-{n}")  # reference cached
    return {"first_s": first, "cached_reference_s": time.perf_counter() - t0, "images": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the measurements as JSON here")
    p.add_argument(
        "--deadline", type=float, default=240.0, help="seconds; no new measurement after"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (a check on a CPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to warm up)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    q = args.quick
    plan = []
    for b in (8,) if q else (128, 256, 512, 1024, 2048):
        plan.append(("train", "unet-cifar-fast", b, {}))
    for b in (8,) if q else (256, 1024):
        plan.append(("train", "unet-cifar", b, {}))
    plan.append(("train", "unet-cifar-fast", 8 if q else 1024, {"channels_last": True}))
    for b in (8,) if q else (1000, 2500, 5000):
        for bf16 in (False, True):
            plan.append(("sample", "unet-cifar-fast", b, {"bf16": bf16}))
    plan.append(("fid", None, 16 if q else 5000, {}))
    if args.compile:
        plan.append(
            (
                "sample",
                "unet-cifar-fast",
                8 if q else 2500,
                {"bf16": True, "compile_mode": "reduce-overhead"},
            )
        )
        plan.append(("train", "unet-cifar-fast", 8 if q else 1024, {"compile_mode": "default"}))

    start = time.perf_counter()
    rows = []
    for kind, net, batch, kw in plan:
        if time.perf_counter() - start > args.deadline:
            print(f"deadline: skipped {kind} {net} {batch} {kw}", flush=True)
            continue
        try:
            if kind == "train":
                r = train_rate(net, batch, device, 3 if q else 10, 2 if q else 3, **kw)
            elif kind == "sample":
                r = sample_rate(net, batch, device, 2 if q else 5, **kw)
            else:
                r = fid_rate(batch, device)
        except Exception as err:  # a measurement that fails is reported, the rest go on
            r = {"error": f"{type(err).__name__}: {err}"[:300]}
        row = {"kind": kind, "net": net, "batch": batch, **kw, **r}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = results.benchmark_record(  # the networks and batches that size the gpu profile
        "throughput",
        "gpu",
        results.device_name(device),
        {"rows": rows},
        time.perf_counter() - start,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
