import pytest
import torch

from osdlib import data, metrics, nets, paths
from osdlib.methods import score_distillation as sd
from osdlib.teachers import GaussianMixtureTeacher


def gaussian_score(x_sigma, sigma, mean, std):
    """Score of N(mean, std^2 I) convolved with N(0, sigma^2 I)."""
    return -(x_sigma - mean) / (std**2 + sigma[:, None] ** 2)


def test_mixture_teacher_single_gaussian_is_exact():
    mean, std = torch.tensor([[1.0, -2.0]]), 0.7
    teacher = GaussianMixtureTeacher(mean, std)
    x_sigma = torch.randn(64, 2) * 3
    sigma = torch.rand(64) * 5 + 0.01
    expected = mean + std**2 / (std**2 + sigma[:, None] ** 2) * (x_sigma - mean)
    torch.testing.assert_close(teacher.denoise(x_sigma, sigma), expected, rtol=1e-4, atol=1e-5)
    t = paths.sigma_to_t(sigma)
    score = teacher.score(x_sigma * (1 - t[:, None]), t)  # the score of x_t
    torch.testing.assert_close(
        score, gaussian_score(x_sigma, sigma, mean, std) / (1 - t[:, None]), rtol=1e-3, atol=1e-4
    )


def test_mixture_teacher_samples_the_eight_gaussians():
    teacher = GaussianMixtureTeacher.eight_gaussians()
    x = teacher.sample(4000, steps=200, generator=torch.Generator().manual_seed(0)).x
    assert metrics.modes_hit(x, data.eight_gaussian_centers(), min_fraction=0.1) == 8
    ref = data.eight_gaussians(4000, torch.Generator().manual_seed(1))
    floor = metrics.sliced_wasserstein(data.eight_gaussians(4000, torch.Generator()), ref)
    assert metrics.sliced_wasserstein(x, ref) < 2 * floor + 0.05


@pytest.mark.parametrize("kind", sd.WEIGHTINGS)
def test_gradient_is_weighted_score_difference(kind):
    g = torch.Generator().manual_seed(0)
    real = GaussianMixtureTeacher(torch.tensor([[0.0, 0.0]]), 1.0)
    fake = GaussianMixtureTeacher(torch.tensor([[2.0, 1.0]]), 0.5)
    x = torch.randn(32, 2, generator=g)
    sigma = torch.rand(32, generator=g) * 3 + 0.05
    x_sigma = x + sigma[:, None] * torch.randn(32, 2, generator=g)
    d_real, d_fake = real.denoise(x_sigma, sigma), fake.denoise(x_sigma, sigma)
    grad = sd.distillation_gradient(x, x_sigma, sigma, d_real, d_fake, kind)
    diff = gaussian_score(x_sigma, sigma, fake.means, 0.5) - gaussian_score(
        x_sigma, sigma, real.means, 1.0
    )
    w = {"diff-instruct": torch.ones(32), "vsd": sigma**2}.get(kind)
    if w is None:
        w = sigma**2 / (x - d_real).abs().mean(1)
    torch.testing.assert_close(grad, w[:, None] * diff, rtol=1e-4, atol=1e-5)
    same = sd.distillation_gradient(x, x_sigma, sigma, d_real, d_real.clone(), kind)
    assert same.abs().max() == 0


def test_gradient_loss_has_the_gradient():
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    grad = torch.randn(8, 3, 4, 4)
    sd.gradient_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / 8)


def test_dmd_normaliser_and_h():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    torch.testing.assert_close(sd.dmd_normaliser(x, d), torch.tensor([1.5, 2.0]))
    r = torch.tensor([0.5, 1.0, 3.0])
    torch.testing.assert_close(sd.h_of_r("reverse-kl", r), torch.ones(3))
    torch.testing.assert_close(sd.h_of_r("forward-kl", r), r)
    torch.testing.assert_close(sd.h_of_r("js", r), torch.tensor([1 / 3, 0.5, 0.75]))
    with pytest.raises(ValueError, match="divergence"):
        sd.h_of_r("tv", r)


def test_frozen_call_passes_gradient_to_inputs_only():
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(5, 3, requires_grad=True)
    sd.frozen(lin, x).sum().backward()
    assert x.grad is not None and lin.weight.grad is None


def test_recipe_checks():
    with pytest.raises(ValueError, match="weighting"):
        sd.Recipe(weighting="sds")
    with pytest.raises(ValueError, match="discriminator"):
        sd.Recipe(divergence="js")
    with pytest.raises(ValueError, match="fake"):
        sd.Recipe(fake="frozen")


@pytest.mark.parametrize("name", ["mlp-digits-small", "unet-ci"])
def test_features_and_discriminator(name):
    shape = (1, 8, 8) if name.startswith("mlp") else (1, 16, 16)
    net = nets.build(name, shape, num_classes=10)
    dim = sd.feature_dim(net, shape, 10)
    disc = sd.Discriminator(net, dim)
    x, y = torch.randn(4, *shape), torch.arange(4)
    assert disc(x, torch.rand(4), y).shape == (4,)
    assert net(x, torch.rand(4), y).shape == x.shape


def test_few_step_generator_and_backward_simulation():
    G = sd.Generator(nets.build("mlp-2d", (2,), hidden=32), times=(1.0, 0.5))
    z = torch.randn(16, 2)
    x_t, t = G.run(z, steps=1)
    assert torch.equal(x_t, z) and torch.all(t == 1.0)
    x_t, t = G.run(z, generator=torch.Generator().manual_seed(0))
    assert torch.all(t == 0.5) and not torch.equal(x_t, z)
    assert G.sample(z).shape == z.shape


def _toy_run(recipe, steps):
    """A small generator on 8 Gaussians against the exact teacher."""
    torch.manual_seed(0)
    real = GaussianMixtureTeacher.eight_gaussians()
    G = sd.Generator(nets.build("mlp-2d", (2,), hidden=128))
    model = sd.Distiller(G, nets.build("mlp-2d", (2,), hidden=128), (2,))
    run = sd.distill(
        recipe,
        real,
        model,
        lambda g: data.eight_gaussians(512, g),
        steps,
        lr=1e-3,
        progress=False,
        ema_decay=0.99,
    )
    x = run.ema.generator.sample(torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
    return metrics.modes_hit(x, data.eight_gaussian_centers(), min_fraction=0.05)


def test_toy_vsd_covers_modes_sds_does_not():
    vsd = _toy_run(sd.Recipe(weighting="vsd"), 600)
    sds = _toy_run(sd.Recipe(weighting="vsd", fake="none"), 600)
    assert vsd >= 7, vsd
    assert sds < vsd, (sds, vsd)


def _tiny_distiller(discriminator=False):
    return sd.Distiller(
        sd.Generator(nets.build("mlp-2d", (2,), hidden=16)),
        nets.build("mlp-2d", (2,), hidden=16),
        (2,),
        discriminator=discriminator,
    )


def test_ttur_updates_the_generator_every_gen_every_iterations():
    real = GaussianMixtureTeacher.eight_gaussians()
    model = _tiny_distiller(discriminator=True)
    recipe = sd.Recipe(gen_every=3, gan_gen=1.0, gan_critic=1.0)
    g = torch.Generator().manual_seed(0)
    batch = data.eight_gaussians(64, g)
    for step, gen_update in ((0, True), (1, False), (3, True)):
        model.zero_grad(set_to_none=True)
        loss, logs = sd.loss_fn(recipe, real, model, batch, g, step)
        loss.backward()
        got = [p.grad is not None for p in model.generator.parameters()]
        assert all(got) if gen_update else not any(got)
        assert ("gen" in logs) == gen_update and "critic" in logs and "fake" in logs
        assert model.disc.head[1].weight.grad is not None  # the critic trains every iteration


def test_distill_checks_its_inputs():
    real = GaussianMixtureTeacher.eight_gaussians()
    model = _tiny_distiller()
    with pytest.raises(ValueError, match="pairs"):
        sd.distill(sd.Recipe(regression=0.25), real, model, lambda g: None, 1)
    with pytest.raises(ValueError, match="discriminator=True"):
        sd.distill(sd.Recipe(gan_gen=1e-3, gan_critic=1e-2), real, model, lambda g: None, 1)


def test_regression_loss_uses_teacher_pairs(tmp_path):
    from osdlib.methods import rectified_flow

    real = GaussianMixtureTeacher.eight_gaussians()
    pairs = rectified_flow.generate_pairs(real, 64, tmp_path / "pairs", steps=10, progress=False)
    model = _tiny_distiller()
    g = torch.Generator().manual_seed(0)
    _, logs = sd.loss_fn(
        sd.Recipe(regression=1.0), real, model, data.eight_gaussians(32, g), g, 0, pairs
    )
    x, z, _ = pairs.batch(64)
    expected_scale = (x - model.generator(z, 1.0)).pow(2).mean().item()
    assert 0.3 * expected_scale < logs["regression"] < 3 * expected_scale
