"""How strong chapter 05's held-out judge is: an MLP on pixels, with the chapter's recipe.

    python benchmarks/judge_strength.py --data DIR/train --steps 1500 4000 \\
        --label "CIFAR-10 (JPEG copy)" --out results/benchmarks/judge-cifar10-<device>.json

ReNO's chapter measures reward hacking with a judge that is never optimised against: an MLP
on the flattened image (:class:`osdlib.nets.MLPClassifier`, seed = chapter seed + 1), trained
with :func:`osdlib.metrics.train_classifier` and scored on the 20% of the images it held out.
How much its verdicts mean depends on how well it classifies real images, which this script
measures for each number of training steps given (``--steps``; the chapter's `gpu` profile
trains it for ``heldout_steps`` = 1500). The global random generator, from which the MLP's
dropout draws, is seeded with ``--seed`` before each training here; in the chapter it is
wherever the cells before have left it, so the chapter's judge is a draw of the same recipe,
not this network. ``--data`` is a class-folder copy of CIFAR-10's
training set (``DIR/train/<class>/*``); without it, the 8x8 digits of the `book` profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osdlib import data, metrics, nets, profiles, results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a class folder of CIFAR-10's training images; else digits")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        help="training steps to measure (default: chapter 05's heldout_steps at gpu)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the judge's seed (chapter: seed + 1)")
    parser.add_argument("--label", help="the data's name in the record (default: its description)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="record path (default: print it only)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    if args.data is not None:
        folder = Path(args.data)
        if not folder.is_dir() or not any(d.is_dir() for d in folder.iterdir()):
            raise SystemExit(
                f"{folder} is not a class folder: --data needs CIFAR-10's training images as "
                "<class>/<image> folders (as scripts/offline_run.sh unpacks them)"
            )
        images = data.load("cifar10", root=folder)
        profile = "gpu"
    else:
        images, profile = data.load("digits"), "book"
    steps = args.steps or [profiles.resolve("reno", profile).heldout_steps]
    label = args.label or images.description

    accuracy, wall = {}, {}
    for n in steps:
        torch.manual_seed(args.seed)  # the MLP's dropout draws from the global generator
        _, info = metrics.train_classifier(
            images,
            n,
            seed=args.seed,
            device=args.device,
            net=lambda: nets.MLPClassifier(images.shape, images.num_classes),
            desc=f"MLP judge, {n} steps",
        )
        accuracy[str(n)], wall[str(n)] = info["test_accuracy"], info["train_wall_s"]
        print(
            f"MLP judge after {n:,} steps: held-out accuracy {info['test_accuracy']:.3f} "
            f"({info['test_size']:,} images held out; {info['train_wall_s']:.0f} s of training)"
        )
    record = results.benchmark_record(
        "Held-out judge of chapter 05: an MLP on pixels",
        profile,
        results.device_name(args.device),
        {
            "test_accuracy": accuracy,
            "train_wall_s": wall,
            "images": len(images),
            "holdout": 0.2,
            "seed": args.seed,
            "chance": 1 / images.num_classes,
        },
        time.perf_counter() - t_start,
        dataset=label,
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
