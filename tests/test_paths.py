import torch

from osdlib import paths
from osdlib.methods import flow_matching


def gaussian_optimal_velocity(x_t, t, m, s):
    """E[z - x | x_t] for x ~ N(m, s^2 I), z ~ N(0, I), x_t = (1 - t) x + t z (closed form)."""
    var = (1 - t) ** 2 * s**2 + t**2
    centred = x_t - (1 - t) * m
    e_z = t / var * centred
    e_x = m + (1 - t) * s**2 / var * centred
    return e_z - e_x


def test_interpolant_endpoints_and_velocity():
    x, z = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(paths.interpolate(x, z, 0.0), x)
    assert torch.allclose(paths.interpolate(x, z, 1.0), z)
    t = torch.rand(5)
    h = 1e-3
    fd = (paths.interpolate(x, z, t + h) - paths.interpolate(x, z, t - h)) / (2 * h)
    assert torch.allclose(fd, paths.target_velocity(x, z), atol=1e-3)


def test_sigma_conversions_round_trip():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(paths.sigma_to_t(paths.t_to_sigma(t)), t)
    sigma = paths.t_to_sigma(t)
    assert torch.allclose(paths.alpha_bar_to_sigma(paths.sigma_to_alpha_bar(sigma)), sigma)
    # x_t / (1 - t) = x + sigma z
    x, z = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    lhs = paths.interpolate(x, z, t) / (1 - t)[:, None]
    assert torch.allclose(lhs, x + sigma[:, None] * z)


def test_parameterisation_round_trips():
    x_t, v = torch.randn(8, 4), torch.randn(8, 4)
    t = torch.rand(8) * 0.9 + 0.05
    x0 = paths.velocity_to_x0(v, x_t, t)
    eps = paths.velocity_to_eps(v, x_t, t)
    score = paths.velocity_to_score(v, x_t, t)
    assert torch.allclose(paths.x0_to_velocity(x0, x_t, t), v, atol=1e-5)
    assert torch.allclose(paths.eps_to_velocity(eps, x_t, t), v, atol=1e-4)
    assert torch.allclose(paths.score_to_velocity(score, x_t, t), v, atol=1e-4)
    # the estimates reassemble x_t
    tb = t[:, None]
    assert torch.allclose((1 - tb) * x0 + tb * eps, x_t, atol=1e-5)


def test_optimal_velocity_gives_the_analytic_score():
    # For Gaussian data, p_t = N((1-t) m, ((1-t)^2 s^2 + t^2) I); its score is known exactly.
    m, s = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.7
    x_t = torch.randn(100, 2, dtype=torch.float64) * 2
    for t in (0.1, 0.5, 0.9):
        v = gaussian_optimal_velocity(x_t, t, m, s)
        var = (1 - t) ** 2 * s**2 + t**2
        score = -(x_t - (1 - t) * m) / var
        assert torch.allclose(paths.velocity_to_score(v, x_t, t), score)


def test_optimal_velocity_minimises_the_flow_matching_loss():
    m, s = torch.tensor([2.0, 0.0]), 0.5
    x = m + s * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))

    def loss_with(offset):
        def net(x_t, t, y=None):
            return gaussian_optimal_velocity(x_t, t[:, None], m, s) + offset

        return flow_matching.loss(net, x, generator=torch.Generator().manual_seed(1)).item()

    best = loss_with(0.0)
    assert best < loss_with(0.05) and best < loss_with(-0.05)


def test_flow_matching_learns_the_gaussian_velocity():
    torch.manual_seed(0)
    from osdlib import nets

    m, s = torch.tensor([2.0, -1.0]), 0.5
    net = nets.TimeMLP((2,), hidden=128, depth=3)

    def sample(n, generator=None):
        return m + s * torch.randn(n, 2, generator=generator)

    result = flow_matching.train_2d(
        net, sample, steps=800, batch=512, lr=2e-3, ema_decay=0.99, progress=False
    )
    x_t = torch.randn(2000, 2) * 1.2 + torch.tensor([1.0, -0.5])
    errs = []
    for t in (0.3, 0.5, 0.7):
        with torch.no_grad():
            v = result.ema(x_t, torch.full((2000,), t))
        ref = gaussian_optimal_velocity(x_t, t, m, s)
        errs.append(((v - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(0.5)).median().item())
    assert max(errs) < 0.15, errs
