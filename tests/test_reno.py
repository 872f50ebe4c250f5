import math

import pytest
import torch

from osdlib.methods import reno as rn


def test_noise_nll_minimum_is_at_sqrt_d_minus_1():
    d = 64
    u = torch.randn(1, d)
    u = u / u.norm()
    radii = torch.linspace(1.0, 15.0, 2801)
    values = rn.noise_nll(radii.view(-1, 1) * u)
    best = float(radii[values.argmin()])
    assert abs(best - math.sqrt(d - 1)) < 0.01
    # its derivative in r is r - (d - 1) / r: zero exactly there
    r = torch.tensor([math.sqrt(d - 1)], requires_grad=True)
    (g,) = torch.autograd.grad(rn.noise_nll(r * u).sum(), r)
    assert abs(float(g)) < 1e-4


def test_noise_nll_is_float32_for_half_inputs():
    z = torch.randn(3, 4, 8, 8).half()
    assert rn.noise_nll(z).dtype == torch.float32


def test_scaled_step_keeps_the_relative_step():
    lr, clip = rn.scaled_step(rn.RENO_DIM)
    assert (lr, clip) == (rn.RENO_LR, rn.RENO_CLIP)
    lr, clip = rn.scaled_step(64)
    ratio_ref = rn.RENO_LR * rn.RENO_CLIP / math.sqrt(rn.RENO_DIM)
    assert math.isclose(lr * clip / math.sqrt(64), ratio_ref)


def test_clip_per_sample():
    g = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    out = rn.clip_per_sample(g, 1.0)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], g[1])  # below the bound: unchanged


def test_reno_moves_the_noise_to_the_reward_optimum_in_closed_form():
    """G = identity, r = -||x - a||^2: without the regulariser z walks straight to a; every
    clipped step has length lr * clip, so the distance falls by lr * clip per step at first."""
    a = torch.tensor([[2.0, -1.0], [0.5, 0.5]])

    def reward(x, y):
        return -((x - a) ** 2).sum(1)

    z0 = torch.zeros(2, 2)
    out = rn.reno(lambda z, y: z, z0, None, [(reward, 1.0)], steps=200, lr=1.0, clip=0.05, lam=0)
    assert torch.allclose(out.x, a, atol=0.05)
    assert torch.equal(out.z, out.x)
    assert (out.reward > out.initial_reward).all()
    assert out.history["reward"].shape == (200, 2)
    assert out.forward_passes == 200
    # first step without momentum: the step is exactly lr * clip long
    one = rn.reno(
        lambda z, y: z,
        z0,
        None,
        [(reward, 1.0)],
        steps=2,
        lr=1.0,
        clip=0.05,
        lam=0,
        momentum=0.0,
        nesterov=False,
    )
    assert torch.allclose(one.history["norm"][1], torch.full((2,), 0.05))
    assert torch.equal(z0, torch.zeros(2, 2))  # the input is not modified


def test_regulariser_pulls_the_norm_to_the_shell():
    d = 16
    z0 = 0.5 * torch.randn(4, d)  # well inside the shell sqrt(15) ~ 3.9

    def zero(x, y):
        return x.sum(1) * 0

    out = rn.reno(lambda z, y: z, z0, None, [(zero, 1.0)], steps=300, lr=1.0, clip=0.1, lam=1.0)
    final = out.history["norm"][-1]
    assert torch.allclose(final, torch.full((4,), math.sqrt(d - 1)), atol=0.2)


@pytest.mark.parametrize("lam", [0.0, 100.0])
def test_best_iterate_is_chosen_by_reward_not_by_the_last_step(lam):
    """A reward that peaks at the third forward pass: the result is that iterate. With a
    strong regulariser pulling z (far off the shell) in, the total loss keeps falling after
    that pass (by hundreds, against the reward's drop of 6): the regulariser does not choose."""
    calls = {"n": 0}

    def G(z, y):
        calls["n"] += 1
        return z

    schedule = torch.tensor([0.0, 1.0, 5.0, 2.0, -1.0])

    def reward(x, y):  # a tiny slope so that z moves (each step is clipped to length 1)
        return 1e-6 * x.sum(1) + schedule[calls["n"] - 1]

    z0 = torch.randn(3, 4) * (10.0 if lam else 1.0)
    out = rn.reno(G, z0, None, [(reward, 1.0)], steps=5, lr=0.1, clip=1.0, lam=lam)
    if lam:  # the total loss is lowest at the last pass, far below the best iterate's
        norm = out.history["norm"]  # (passes, batch)
        total = -schedule[:, None] + lam * (0.5 * norm**2 - 3 * torch.log(norm))
        assert (total.argmin(0) == 4).all() and (total[2] - total[4] > 100).all()
    assert calls["n"] == 5
    assert (out.best_step == 2).all()
    assert torch.allclose(out.reward, torch.full((3,), 5.0), atol=1e-4)
    assert torch.allclose(out.initial_reward, torch.zeros(3), atol=1e-4)
    assert not torch.equal(out.z, z0)  # the third iterate, after two steps


def test_samples_are_independent_problems():
    """Sample 0's result does not depend on what else is in the batch."""
    torch.manual_seed(0)
    W = torch.randn(6, 6)

    def G(z, y):
        return torch.tanh(z @ W)

    def reward(x, y):
        return -((x - 0.3) ** 2).sum(1)

    z = torch.randn(5, 6)
    together = rn.reno(G, z, None, [(reward, 1.0)], steps=20)
    alone = rn.reno(G, z[:1], None, [(reward, 1.0)], steps=20)
    assert torch.allclose(together.z[0], alone.z[0], atol=1e-6)


def test_weighted_sum_of_rewards():
    def r1(x, y):
        return x.sum(1)

    def r2(x, y):
        return -x.abs().sum(1)

    x = torch.tensor([[1.0, -2.0]])
    total, parts = rn.weighted_reward(x, None, [(r1, 2.0), (r2, 0.5)])
    assert torch.allclose(total, torch.tensor([2.0 * -1.0 + 0.5 * -3.0]))
    assert len(parts) == 2


def test_best_of_n_keeps_the_best_draw():
    def reward(x, y):
        return -(x**2).sum(1)

    g = torch.Generator().manual_seed(0)
    x, z, r = rn.best_of_n(lambda z, y: z, (3,), None, [(reward, 1.0)], n=50, batch=8, generator=g)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.randn(8, 3, generator=g) for _ in range(50)])
    expected = (draws**2).sum(2).min(0).values
    assert torch.allclose(-r, expected)
    assert torch.equal(x, z)


def test_class_log_prob_and_mean_intensity():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2) * 2 - 1
    y = torch.tensor([0, 2])
    r = rn.ClassLogProb(clf)(x, y)
    expected = torch.log_softmax(clf(x), 1)[[0, 1], [0, 2]]
    assert torch.allclose(r, expected)
    assert not any(p.requires_grad for p in clf.parameters())  # frozen
    with pytest.raises(ValueError):
        rn.ClassLogProb(clf)(x, None)
    bright = rn.MeanIntensity(target=0.5, scale=0.1)
    assert torch.allclose(bright(torch.zeros(1, 1, 2, 2)), torch.zeros(1))  # 0 -> 0.5 in [0, 1]
    assert torch.allclose(bright(torch.ones(1, 1, 2, 2)), torch.tensor([-25.0]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        rn.reno(lambda z, y: z, torch.zeros(1, 2), None, [], steps=5)
    with pytest.raises(ValueError):
        rn.reno(lambda z, y: z, torch.zeros(1, 2), None, [(lambda x, y: x.sum(1), 1.0)], steps=0)
