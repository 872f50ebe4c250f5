import math

import pytest
import scipy.stats
import torch

from osdlib import nets
from osdlib.methods import consistency as cm


def test_boundary_condition_is_exact():
    f = cm.ConsistencyModel(nets.build("mlp-2d", (2,)))
    x = torch.randn(16, 2) * 3
    assert torch.equal(f(x, torch.tensor(cm.SIGMA_MIN)), x)
    g = cm.FlowConsistency(nets.build("mlp-2d", (2,)))
    assert torch.equal(g(x, torch.tensor(0.0)), x)


def test_scalings_use_the_square_root():
    sigma = torch.tensor([0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = cm.scalings(sigma)
    assert torch.allclose(c_in, 1 / torch.sqrt(sigma**2 + 0.25))
    assert torch.allclose(c_out, (sigma - 0.002) * 0.5 / torch.sqrt(sigma**2 + 0.25))
    assert torch.allclose(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))


@pytest.mark.parametrize(
    "k, expected", [(0, 11), (124, 11), (125, 21), (250, 41), (874, 641), (875, 1281), (999, 1281)]
)
def test_curriculum_formula(k, expected):
    # K = 1000, s0 = 10, s1 = 1280: K' = floor(1000 / (log2(128) + 1)) = 125
    assert cm.curriculum(k, 1000) == expected


def test_curriculum_with_a_small_s1():
    # s1 = 150: K' = floor(1000 / (log2(15) + 1)) = 203; N(999) = min(10 * 2^4, 150) + 1
    assert cm.curriculum(0, 1000, s1=150) == 11
    assert cm.curriculum(999, 1000, s1=150) == 151


def test_karras_sigmas():
    s = cm.karras_sigmas(11)
    assert s[0] == pytest.approx(0.002) and s[-1] == pytest.approx(80.0)
    assert torch.all(s[1:] > s[:-1])


def test_discretised_lognormal_matches_the_erf_formula_and_its_frequencies():
    sigmas = cm.karras_sigmas(41)
    w = cm.lognormal_weights(sigmas)
    cdf = scipy.stats.norm.cdf((torch.log(sigmas.double()).numpy() + 1.1) / 2.0)
    ref = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    assert torch.allclose(w.double(), torch.tensor(ref), atol=1e-6)
    lo, hi = cm.sample_pairs(200_000, sigmas, torch.Generator().manual_seed(0))
    idx = torch.searchsorted(sigmas, lo)
    assert torch.equal(sigmas[idx + 1], hi)  # adjacent levels
    freq = torch.bincount(idx, minlength=40).double() / 200_000
    assert torch.allclose(freq, w.double(), atol=4e-3)


def test_same_dropout_mask_for_both_evaluations():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    with cm.same_dropout() as again:
        a = drop(x)
        again()
        b = drop(x)
    assert torch.equal(a, b)
    assert not torch.equal(drop(x), drop(x))


class GaussianF(torch.nn.Module):
    """The exact consistency function of 1-D data N(0, s^2): f(x, sigma) = x s / sqrt(s^2 + sigma^2)."""

    def __init__(self, s, bias=0.0):
        super().__init__()
        self.s, self.bias = s, bias
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, y=None):
        sigma = sigma.reshape(-1, 1)
        return x * self.s / torch.sqrt(self.s**2 + sigma**2) + self.bias + 0 * self.dummy


def test_distillation_loss_vanishes_for_the_exact_consistency_function():
    s = 0.7
    x = s * torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    sigmas = cm.karras_sigmas(18)
    lo, hi = cm.sample_pairs(len(x), sigmas, torch.Generator().manual_seed(1))

    def exact_step(x_next, sigma_next, sigma, y=None):  # the PF-ODE in closed form
        return x_next * torch.sqrt((s**2 + sigma**2) / (s**2 + sigma_next**2)).reshape(-1, 1)

    g = torch.Generator().manual_seed(2)
    exact = cm.consistency_loss(GaussianF(s), x, lo, hi, teacher_step=exact_step, generator=g)
    assert exact.item() < 1e-4
    wrong = cm.consistency_loss(GaussianF(s * 1.5), x, lo, hi, teacher_step=exact_step, generator=g)
    assert wrong.item() > 100 * exact.item()
    # Euler steps of the exact denoiser D(x, sigma) = x s^2 / (s^2 + sigma^2) are first-order close
    denoiser = lambda x, sig, y=None: x * s**2 / (s**2 + sig.reshape(-1, 1) ** 2)  # noqa: E731
    euler = cm.euler_teacher_step(denoiser)
    x_next = torch.ones(3, 1) * 2.0
    a, b = torch.full((3,), 1.0), torch.full((3,), 1.01)
    assert torch.allclose(euler(x_next, b, a), exact_step(x_next, b, a), atol=1e-4)


def test_ect_gap_shrinks_with_the_stage_and_hits_zero_for_small_sigma():
    sigma = torch.tensor([0.001, 0.5, 5.0, 50.0])
    gaps = [(sigma - cm.ect_r(sigma, stage)) / sigma for stage in range(4)]
    assert all(torch.all(gaps[i + 1] < gaps[i]) for i in range(3))
    assert cm.ect_r(torch.tensor([0.001]), 0).item() == 0.0  # r clamps at 0: target is the data


def test_multistep_sampling_renoises():
    f = GaussianF(1.0)
    z = torch.randn(5000, 1, generator=torch.Generator().manual_seed(0))
    one = cm.sample(f, z)
    two = cm.sample(f, z, (80.0, 0.821), generator=torch.Generator().manual_seed(1))
    assert one.std().item() == pytest.approx(1.0, abs=0.05)
    assert two.std().item() == pytest.approx(1.0, abs=0.05)
    assert not torch.allclose(one, two)


def test_losses_train_on_the_chapter_loop():
    torch.manual_seed(0)
    f = cm.ConsistencyModel(nets.build("mlp-2d", (2,), hidden=32))
    batch = lambda g: torch.randn(64, 2, generator=g) * 0.5  # noqa: E731
    res = cm.train_ict(f, batch, steps=20, s1=40, progress=False, log_every=10)
    assert math.isfinite(res.history["loss"][-1])
    g = cm.FlowConsistency(nets.build("mlp-2d", (2,), hidden=32))
    res = cm.train_ect(g, batch, steps=20, stages=2, progress=False, log_every=10)
    assert math.isfinite(res.history["loss"][-1])
