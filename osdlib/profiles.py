"""Named run sizes: one notebook, four sizes.

A chapter's ``parameters`` cell sets ``profile`` (and optionally ``overrides``); the next
cell calls :func:`resolve`, which returns every derived setting of that chapter. Any single
setting can still be overridden, e.g. ``papermill ... -p profile gpu -y "overrides: {steps: 500}"``.

=======  ====================  ===========================================================
profile  where                 purpose
=======  ====================  ===========================================================
ci       any CPU, <= 60 s      every code path runs at tiny sizes (nbval in CI)
book     CPU laptop, <= 10 min what the committed outputs show: 2-D toys fully, digits
gpu      one GPU, <= 15 min    CIFAR-10-scale results with the real pipeline
paper    one GPU per chapter   the paper's configuration, documented, runnable (training
                               also under torchrun, see osdlib.train)
auto     -                     ``gpu`` when CUDA is available, else ``book``
=======  ====================  ===========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

PROFILES = ("ci", "book", "gpu", "paper")

# Settings shared by every chapter at a given profile.
_COMMON: dict[str, dict[str, Any]] = {
    # `download`: may a dataset be fetched? `fid`: standard FID (Inception weights needed)?
    # `toy_device`: where the 2-D toys train (their evaluation and pictures stay on the CPU);
    # `tf32`: TensorFloat-32 matrix products on CUDA (sampling and FID in fp32 run 2-3x faster);
    # `fid_reference`: how many training images FID's reference statistics use (None: all);
    # `sample_bf16`: sample under bf16 autocast (1.6x faster on an H200, measured; the `paper`
    # profile samples in float32 as the papers do).
    "ci": {
        "device": "cpu",
        "eval_samples": 200,
        "download": False,
        "fid": False,
        "toy_device": "cpu",
        "tf32": False,
        "fid_reference": None,
        "sample_bf16": False,
    },
    "book": {
        "device": "cpu",
        "eval_samples": 2000,
        "download": False,
        "fid": False,
        "toy_device": "cpu",
        "tf32": False,
        "fid_reference": None,
        "sample_bf16": False,
    },
    "gpu": {
        "device": "cuda",
        "eval_samples": 5000,
        "download": True,
        "fid": True,
        "toy_device": "cuda",
        "tf32": True,
        "fid_reference": None,
        "sample_bf16": True,
    },
    "paper": {
        "device": "cuda",
        "eval_samples": 50_000,
        "download": True,
        "fid": True,
        "toy_device": "cuda",
        "tf32": True,
        "fid_reference": None,
        "sample_bf16": False,
    },
}

# The `gpu` profile is sized so that the whole book runs in one 15-minute slot on one GPU:
# chapter 00 (which trains the teacher) in about 3.5 minutes, every later chapter in about
# 85 s from the cached teacher. The sizes come from measurements on an H200
# (results/benchmarks/): steps of the 9M teacher take about as long at batch 512 as at 256
# (kernel launches dominate), so image training uses big batches; sampling runs under bf16
# autocast (1.6x); a chapter keeps the variants that fit (`distill_ks`, `image_methods`,
# `ablation`) and its 2-D toys are shorter than at `book` (in chapters 03 and 04 much
# shorter: a toy iteration there cost 14-20 ms on an H200 by the times of chapter 03's toy
# cells in the first chain run, where small kernels and the batched seeds' dispatch
# dominate, and 300 per recipe took 44 s of chapter 03's 90). Image
# training runs are capped by wall time (`image_seconds`, see
# `osdlib.train.train(max_seconds=...)`): the step counts are the plan, the cap is the
# budget, and every record says how many steps really ran. Chapter 05 loads the one-step
# generators that chapters 01, 02 and 04 stored (`osdlib.generators.put`) when it finds them
# (the same recipe, seed and device), and otherwise trains them.

# Per-chapter settings. Keys are chapter ids (the notebook's file stem without the number).
CHAPTERS: dict[str, dict[str, dict[str, Any]]] = {
    "foundations": {
        "ci": {
            "toy": "8gaussians",
            "toy_steps": 300,
            "toy_batch": 512,
            "toy_hidden": 128,
            "toy_gallery_steps": 60,
            "toy_lr": 0.003,
            "toy_eval": 1000,
            "image_data": "digits",
            "image_net": "mlp-digits",
            "image_steps": 200,
            "image_batch": 128,
            "image_lr": 0.001,
            "ema_decay": 0.99,
            "classifier_steps": 100,
            "nfe_list": [1, 2, 4, 8],
            "image_seconds": None,
            "heun_max_nfe": 8,
        },
        "book": {
            "toy": "8gaussians",
            "toy_steps": 3000,
            "toy_batch": 1024,
            "toy_hidden": 256,
            "toy_gallery_steps": 2000,
            "toy_lr": 0.003,
            "toy_eval": 5000,
            "image_data": "digits",
            "image_net": "mlp-digits",
            "image_steps": 8000,
            "image_batch": 256,
            "image_lr": 0.001,
            "ema_decay": 0.999,
            "classifier_steps": 800,
            "nfe_list": [1, 2, 4, 8, 16, 32, 100],
            "image_seconds": None,
            "heun_max_nfe": 100,
        },
        "gpu": {
            "toy": "8gaussians",
            "toy_steps": 2000,
            "toy_batch": 2048,
            "toy_hidden": 256,
            "toy_gallery_steps": 600,
            "toy_lr": 0.003,
            "toy_eval": 5000,
            "image_data": "cifar10",
            "image_net": "unet-cifar-fast",
            "image_steps": 1000,
            "image_batch": 512,
            "image_lr": 0.0005,
            "ema_decay": 0.999,
            "classifier_steps": 1000,
            "nfe_list": [1, 2, 4, 8, 16, 32],
            "image_seconds": 90,
            "heun_max_nfe": 4,
        },
        "paper": {
            "toy": "8gaussians",
            "toy_steps": 20_000,
            "toy_batch": 4096,
            "toy_hidden": 256,
            "toy_gallery_steps": 5000,
            "toy_lr": 0.003,
            "toy_eval": 10_000,
            "image_data": "cifar10",
            "image_net": "unet-cifar",
            "image_steps": 400_000,
            "image_batch": 128,
            "image_lr": 0.0002,
            "ema_decay": 0.9999,
            "classifier_steps": 10_000,
            "nfe_list": [1, 2, 4, 8, 16, 32, 100],
            "image_seconds": None,
            "heun_max_nfe": 100,
        },
    },
    "rectified_flow": {
        "ci": {
            "toy": "8gaussians",
            "toy_steps": 300,
            "toy_batch": 512,
            "toy_hidden": 128,
            "toy_lr": 0.003,
            "toy_pairs": 2000,
            "toy_pair_steps": 20,
            "toy_reflow_steps": 300,
            "toy_eval": 1000,
            "pairs": 600,
            "pair_steps": 16,
            "fp16_pairs": True,
            "reflow_steps": 60,
            "distill_steps": 40,
            "slim_net": "mlp-digits-small",
            "slim_reflow_steps": 60,
            "slim_distill_steps": 40,
            "batch": 128,
            "lr": 0.0005,
            "distance": "l2",
            "nfe_list": [1, 2, 4],
            "image_seconds": None,
            "straightness_steps": 100,
            "distill_ks": [1, 2, 4],
        },
        "book": {
            "toy": "8gaussians",
            "toy_steps": 3000,
            "toy_batch": 1024,
            "toy_hidden": 256,
            "toy_lr": 0.003,
            "toy_pairs": 30_000,
            "toy_pair_steps": 100,
            "toy_reflow_steps": 2000,
            "toy_eval": 5000,
            "pairs": 20_000,
            "pair_steps": 100,
            "fp16_pairs": False,
            "reflow_steps": 3000,
            "distill_steps": 1000,
            "slim_net": "mlp-digits-small",
            "slim_reflow_steps": 3000,
            "slim_distill_steps": 1000,
            "batch": 256,
            "lr": 0.0005,
            "distance": "l2",
            "nfe_list": [1, 2, 4, 8, 16, 100],
            "image_seconds": None,
            "straightness_steps": 100,
            "distill_ks": [1, 2, 4],
        },
        "gpu": {
            "toy": "8gaussians",
            "toy_steps": 1200,
            "toy_batch": 2048,
            "toy_hidden": 256,
            "toy_lr": 0.003,
            "toy_pairs": 10_000,
            "toy_pair_steps": 50,
            "toy_reflow_steps": 1000,
            "toy_eval": 5000,
            "pairs": 4000,
            "pair_steps": 16,
            "fp16_pairs": True,
            "reflow_steps": 500,
            "distill_steps": 300,
            "slim_net": "unet-cifar-tiny",
            "slim_reflow_steps": 300,
            "slim_distill_steps": 300,
            "batch": 256,
            "lr": 0.0002,
            "distance": "l2",
            "nfe_list": [1, 2, 4],
            "image_seconds": 4,
            "straightness_steps": 32,
            "distill_ks": [1],
        },
        "paper": {
            "toy": "8gaussians",
            "toy_steps": 20_000,
            "toy_batch": 4096,
            "toy_hidden": 256,
            "toy_lr": 0.003,
            "toy_pairs": 1_000_000,
            "toy_pair_steps": 100,
            "toy_reflow_steps": 20_000,
            "toy_eval": 10_000,
            "pairs": 1_000_000,
            "pair_steps": 100,
            "fp16_pairs": True,
            "reflow_steps": 300_000,
            "distill_steps": 100_000,
            "slim_net": "unet-cifar-small",
            "slim_reflow_steps": 300_000,
            "slim_distill_steps": 100_000,
            "batch": 128,
            "lr": 0.0002,
            "distance": "lpips",
            "nfe_list": [1, 2, 4, 8, 16, 32],
            "image_seconds": None,
            "straightness_steps": 100,
            "distill_ks": [1, 2, 4],
        },
    },
    "consistency": {
        "ci": {
            "toy": "8gaussians",
            "toy_steps": 200,
            "toy_batch": 512,
            "toy_hidden": 128,
            "toy_lr": 0.003,
            "ct_steps": 150,
            "ct_lr": 0.001,
            "toy_s1": 40,
            "toy_eval": 1000,
            "ect_steps": 40,
            "ect_stages": 2,
            "s0": 10,
            "s1": 40,
            "batch": 128,
            "lr": 0.001,
            "ect_lr": 0.0002,
            "mid_sigma": 0.821,
            "teacher_nfe": 4,
            "image_seconds": None,
            "ict_total": True,
        },
        "book": {
            "toy": "8gaussians",
            "toy_steps": 1500,
            "toy_batch": 512,
            "toy_hidden": 128,
            "toy_lr": 0.003,
            "ct_steps": 2000,
            "ct_lr": 0.001,
            "toy_s1": 150,
            "toy_eval": 5000,
            "ect_steps": 2000,
            "ect_stages": 4,
            "s0": 10,
            "s1": 150,
            "batch": 256,
            "lr": 0.001,
            "ect_lr": 0.0002,
            "mid_sigma": 0.821,
            "teacher_nfe": 100,
            "image_seconds": None,
            "ict_total": True,
        },
        "gpu": {
            "toy": "8gaussians",
            "toy_steps": 1000,
            "toy_batch": 2048,
            "toy_hidden": 256,
            "toy_lr": 0.003,
            "ct_steps": 1000,
            "ct_lr": 0.001,
            "toy_s1": 150,
            "toy_eval": 5000,
            "ect_steps": 80,
            "ect_stages": 4,
            "s0": 10,
            "s1": 150,
            "batch": 256,
            "lr": 0.0002,
            "ect_lr": 0.0001,
            "mid_sigma": 0.821,
            "teacher_nfe": 16,
            "image_seconds": 15,
            "ict_total": False,
        },
        "paper": {
            "toy": "8gaussians",
            "toy_steps": 20_000,
            "toy_batch": 4096,
            "toy_hidden": 256,
            "toy_lr": 0.003,
            "ct_steps": 20_000,
            "ct_lr": 0.001,
            "toy_s1": 1280,
            "toy_eval": 10_000,
            "ect_steps": 100_000,
            "ect_stages": 8,
            "s0": 10,
            "s1": 1280,
            "batch": 1024,
            "lr": 0.0001,
            "ect_lr": 0.0001,
            "mid_sigma": 0.821,
            "teacher_nfe": 100,
            "image_seconds": None,
            "ict_total": True,
        },
    },
    "score_distillation": {
        "ci": {
            "toy": "8gaussians",
            "toy_hidden": 64,
            "toy_batch": 256,
            "toy_steps": 60,
            "toy_lr": 0.001,
            "fake_warmup": 20,
            "toy_eval": 1000,
            "toy_seeds": 2,
            "teacher_steps": 100,
            "steps": 20,
            "batch": 32,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "teacher_nfe": 4,
            "image_seconds": None,
            "image_methods": ["Diff-Instruct", "VSD", "DMD"],
        },
        "book": {
            "toy": "8gaussians",
            "toy_hidden": 64,
            "toy_batch": 256,
            "toy_steps": 1500,
            "toy_lr": 0.001,
            "fake_warmup": 300,
            "toy_eval": 5000,
            "toy_seeds": 3,
            "teacher_steps": 100,
            "steps": 1500,
            "batch": 128,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "teacher_nfe": 100,
            "image_seconds": None,
            "image_methods": ["Diff-Instruct", "VSD", "DMD"],
        },
        "gpu": {
            "toy": "8gaussians",
            "toy_hidden": 128,
            "toy_batch": 1024,
            "toy_steps": 100,
            "toy_lr": 0.001,
            "fake_warmup": 50,
            "toy_eval": 5000,
            "toy_seeds": 3,
            "teacher_steps": 100,
            "steps": 100,
            "batch": 128,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "teacher_nfe": 16,
            "image_seconds": 12,
            "image_methods": ["VSD", "DMD"],
        },
        "paper": {
            "toy": "8gaussians",
            "toy_hidden": 256,
            "toy_batch": 4096,
            "toy_steps": 20_000,
            "toy_lr": 0.001,
            "fake_warmup": 1000,
            "toy_eval": 10_000,
            "toy_seeds": 3,
            "teacher_steps": 200,
            "steps": 200_000,
            "batch": 256,
            "lr": 5e-05,
            "fake_lr": 5e-05,
            "teacher_nfe": 100,
            "image_seconds": None,
            "image_methods": ["Diff-Instruct", "VSD", "DMD"],
        },
    },
    "dmd2": {
        "ci": {
            "toy": "8gaussians",
            "toy_hidden": 64,
            "toy_batch": 256,
            "toy_steps": 60,
            "toy_lr": 0.001,
            "toy_fake_lr_factor": 0.1,
            "toy_pairs": 500,
            "toy_eval": 1000,
            "toy_seeds": 2,
            "teacher_steps": 100,
            "steps": 20,
            "batch": 32,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "ttur": 5,
            "gan_gen": 0.003,
            "gan_critic": 0.01,
            "regression": 0.25,
            "pairs": 200,
            "few_step_times": (1.0, 0.75, 0.5, 0.25),
            "teacher_nfe": 4,
            "image_seconds": None,
            "pair_steps": 4,
            "ablation": ["dmd", "dmd+regression", "ttur", "dmd2", "dmd2-4-step"],
        },
        "book": {
            "toy": "8gaussians",
            "toy_hidden": 64,
            "toy_batch": 256,
            "toy_steps": 1500,
            "toy_lr": 0.001,
            "toy_fake_lr_factor": 0.1,
            "toy_pairs": 5000,
            "toy_eval": 5000,
            "toy_seeds": 3,
            "teacher_steps": 100,
            "steps": 1600,
            "batch": 128,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "ttur": 5,
            "gan_gen": 0.003,
            "gan_critic": 0.01,
            "regression": 0.25,
            "pairs": 5000,
            "few_step_times": (1.0, 0.75, 0.5, 0.25),
            "teacher_nfe": 100,
            "image_seconds": None,
            "pair_steps": 100,
            "ablation": ["dmd", "dmd+regression", "ttur", "dmd2", "dmd2-4-step"],
        },
        "gpu": {
            "toy": "8gaussians",
            "toy_hidden": 128,
            "toy_batch": 1024,
            "toy_steps": 100,
            "toy_lr": 0.001,
            "toy_fake_lr_factor": 0.1,
            "toy_pairs": 2000,
            "toy_eval": 5000,
            "toy_seeds": 3,
            "teacher_steps": 100,
            "steps": 100,
            "batch": 128,
            "lr": 0.0001,
            "fake_lr": 0.0001,
            "ttur": 5,
            "gan_gen": 0.003,
            "gan_critic": 0.01,
            "regression": 0.25,
            "pairs": 2000,
            "few_step_times": (1.0, 0.75, 0.5, 0.25),
            "teacher_nfe": 16,
            "image_seconds": 12,
            "pair_steps": 16,
            "ablation": ["dmd+regression", "dmd2"],
        },
        "paper": {
            "toy": "8gaussians",
            "toy_hidden": 256,
            "toy_batch": 4096,
            "toy_steps": 20_000,
            "toy_lr": 0.001,
            "toy_fake_lr_factor": 0.1,
            "toy_pairs": 10_000,
            "toy_eval": 10_000,
            "toy_seeds": 3,
            "teacher_steps": 200,
            "steps": 200_000,
            "batch": 280,
            "lr": 2e-06,
            "fake_lr": 2e-06,
            "ttur": 5,
            "gan_gen": 0.003,
            "gan_critic": 0.01,
            "regression": 0.25,
            "pairs": 100_000,
            "few_step_times": (1.0, 0.75, 0.5, 0.25),
            "teacher_nfe": 100,
            "image_seconds": None,
            "pair_steps": 100,
            "ablation": ["dmd", "dmd+regression", "ttur", "dmd2", "dmd2-4-step"],
        },
    },
    # ReNO optimises the noise of frozen one-step generators (see osdlib.generators for how
    # they are made). `generator_scale` multiplies the source chapters' step counts when a
    # generator is not in the cache, `generator_seconds` caps each of its training runs (None:
    # as its source chapter caps them, so that at gpu the chapters' own generators are found),
    # `generator_overrides` replaces single settings of those recipes (e.g. {"batch": 8});
    # `batch` independent problems per seed, `reno_steps` forward passes each (best-of-N uses
    # the same number of draws); `intensity_quantile` sets the mean-intensity target at that
    # quantile of the real images (beyond almost all of them: thick digits, bright photos).
    "reno": {
        "ci": {
            "generators": ["2-rf-distilled", "ect", "dmd2"],
            "generator_scale": 1.0,
            "generator_seconds": None,
            "generator_overrides": {},
            "batch": 40,
            "reno_steps": 10,
            "seeds": 2,
            "lam": 0.01,
            "lam_sweep": [0.0, 0.01, 1.0],
            "intensity_quantile": 0.995,
            "intensity_scale": 0.02,
            "intensity_weight": 1.0,
            "heldout_steps": 100,
            "t2i": "tiny",
            "t2i_steps": 4,
        },
        "book": {
            "generators": ["2-rf-distilled", "ect", "dmd2"],
            "generator_scale": 1.0,
            "generator_seconds": None,
            "generator_overrides": {},
            "batch": 500,
            "reno_steps": 50,
            "seeds": 3,
            "lam": 0.01,
            "lam_sweep": [0.0, 0.001, 0.01, 0.1, 1.0],
            "intensity_quantile": 0.995,
            "intensity_scale": 0.02,
            "intensity_weight": 1.0,
            "heldout_steps": 1500,
            "t2i": "tiny",
            "t2i_steps": 20,
        },
        "gpu": {
            "generators": ["2-rf-distilled", "ect", "dmd2"],
            "generator_scale": 1.0,
            "generator_seconds": None,
            "generator_overrides": {},
            "batch": 100,
            "reno_steps": 50,
            "seeds": 3,
            "lam": 0.01,
            "lam_sweep": [0.0, 0.01, 0.1, 1.0],
            "intensity_quantile": 0.995,
            "intensity_scale": 0.02,
            "intensity_weight": 1.0,
            "heldout_steps": 1500,
            "t2i": "sd-turbo",
            "t2i_steps": 50,
        },
        "paper": {
            "generators": ["2-rf-distilled", "ect", "dmd2"],
            "generator_scale": 1.0,
            "generator_seconds": None,
            "generator_overrides": {},
            "batch": 1000,
            "reno_steps": 50,
            "seeds": 3,
            "lam": 0.01,
            "lam_sweep": [0.0, 0.001, 0.01, 0.1, 1.0],
            "intensity_quantile": 0.995,
            "intensity_scale": 0.02,
            "intensity_weight": 1.0,
            "heldout_steps": 5000,
            "t2i": "sd-turbo",
            "t2i_steps": 50,
        },
    },
    # Distilled decoding trains its own tokenizer and AR teacher (nothing from chapter 00):
    # 8x8 digits -> a 4x4 token grid (16 tokens) at ci/book; CIFAR-10 -> 8x8 (64 tokens) at
    # gpu/paper. `pairs` (noise, token) sequences from the flow map with `map_steps` Euler
    # steps per token; `train_seconds` caps each training run at the gpu profile.
    "distilled_decoding": {
        "ci": {
            "image_data": "digits",
            "codes": 16,
            "code_dim": 4,
            "tok_hidden": 16,
            "downsample": 2,
            "tok_steps": 60,
            "tok_batch": 64,
            "ar_dim": 32,
            "ar_depth": 2,
            "ar_heads": 2,
            "ar_steps": 60,
            "ar_batch": 64,
            "lr": 0.001,
            "temperature": 1.0,
            "top_k": None,
            "map_steps": 20,
            "few_map_steps": [1, 2],
            "pairs": 500,
            "student_steps": 60,
            "student_batch": 64,
            "train_seconds": None,
            "classifier_steps": 100,
        },
        "book": {
            "image_data": "digits",
            "codes": 32,
            "code_dim": 4,
            "tok_hidden": 32,
            "downsample": 2,
            "tok_steps": 1500,
            "tok_batch": 128,
            "ar_dim": 64,
            "ar_depth": 4,
            "ar_heads": 4,
            "ar_steps": 2500,
            "ar_batch": 128,
            "lr": 0.001,
            "temperature": 1.0,
            "top_k": None,
            "map_steps": 100,
            "few_map_steps": [1, 2, 4, 10],
            "pairs": 20000,
            "student_steps": 2500,
            "student_batch": 128,
            "train_seconds": None,
            "classifier_steps": 800,
        },
        "gpu": {
            "image_data": "cifar10",
            "codes": 256,
            "code_dim": 8,
            "tok_hidden": 128,
            "downsample": 4,
            "tok_steps": 4000,
            "tok_batch": 256,
            "ar_dim": 256,
            "ar_depth": 6,
            "ar_heads": 8,
            "ar_steps": 6000,
            "ar_batch": 256,
            "lr": 0.0005,
            "temperature": 1.0,
            "top_k": None,
            "map_steps": 100,
            "few_map_steps": [1, 2, 4, 10],
            "pairs": 20000,
            "student_steps": 6000,
            "student_batch": 256,
            "train_seconds": 50,
            "classifier_steps": 1000,
        },
        "paper": {
            "image_data": "cifar10",
            "codes": 512,
            "code_dim": 8,
            "tok_hidden": 128,
            "downsample": 4,
            "tok_steps": 50_000,
            "tok_batch": 256,
            "ar_dim": 512,
            "ar_depth": 12,
            "ar_heads": 8,
            "ar_steps": 200_000,
            "ar_batch": 256,
            "lr": 0.0003,
            "temperature": 1.0,
            "top_k": None,
            "map_steps": 100,
            "few_map_steps": [1, 2, 4, 10],
            "pairs": 1_000_000,
            "student_steps": 200_000,
            "student_batch": 256,
            "train_seconds": None,
            "classifier_steps": 5000,
        },
    },
    # The frontier reads the records the other chapters wrote and trains nothing; it times
    # one network call of each image architecture (random weights: the time does not depend
    # on them) at `timing_batch` to put every generator on a wall-clock axis.
    "frontier": {
        "ci": {"timing_batch": 200, "timing_repeats": 1},
        "book": {"timing_batch": 1000, "timing_repeats": 5},
        "gpu": {"timing_batch": 2500, "timing_repeats": 10},
        "paper": {"timing_batch": 2500, "timing_repeats": 10},
    },
}


def sampling(settings: dict):
    """The context chapters sample in: bf16 autocast on CUDA where the profile asks for it
    (``sample_bf16``), else nothing. The samplers keep their state in float32."""
    from contextlib import nullcontext

    if settings.get("sample_bf16") and settings.get("device") == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Settings(dict):
    """A dict of resolved settings with attribute access and a readable table."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(
                f"no setting {name!r}; available: {', '.join(sorted(self))}"
            ) from err

    def table(self) -> str:
        width = max(len(k) for k in self)
        lines = [f"{'setting'.ljust(width)}  value", f"{'-' * width}  -----"]
        lines += [f"{k.ljust(width)}  {v}" for k, v in self.items()]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| `{k}` | {v} |" for k, v in self.items())
        return "| setting | value |\n|---|---|\n" + rows

    def __repr__(self) -> str:
        return self.table()


def default_profile() -> str:
    """The profile a notebook uses when none is given: ``$OSD_PROFILE`` or ``auto``."""
    return os.environ.get("OSD_PROFILE", "auto")


def pick(profile: str) -> str:
    """Resolve ``auto`` and validate a profile name."""
    name = (profile or "auto").strip().lower()
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "book"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {profile!r}; valid profiles are: {', '.join(PROFILES)} and auto"
        )
    return name


def resolve(
    chapter: str,
    profile: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Every setting of ``chapter`` at ``profile`` (``None`` -> :func:`default_profile`).

    ``overrides`` replaces single settings; an unknown key is an error so that a typo in a
    papermill call does not go unnoticed.
    """
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; valid chapters are: {', '.join(CHAPTERS)}")
    requested = default_profile() if profile is None else profile
    name = pick(requested)
    settings = Settings(profile=name, requested_profile=requested, seed=int(seed))
    settings.update(_COMMON[name])
    settings.update(CHAPTERS[chapter][name])
    for key in ("device", "toy_device"):  # a GPU profile on a CPU machine (a dry run)
        if settings[key] == "cuda" and not torch.cuda.is_available():
            settings[key] = "cpu"
    for key, value in dict(overrides or {}).items():
        if key not in settings:
            raise KeyError(
                f"unknown setting {key!r} for chapter {chapter!r}; "
                f"valid settings are: {', '.join(sorted(settings))}"
            )
        settings[key] = value
    if settings["tf32"] and torch.cuda.is_available():
        # TF32 matrix products and convolutions: the profile's choice of float32 speed on
        # Ampere and later GPUs (training itself runs under bf16 autocast either way)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return settings
