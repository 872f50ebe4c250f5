"""nets.Ensemble: several seeds of a small network trained as one, without mixing them."""

import copy

import pytest
import torch

from osdlib import nets, teachers
from osdlib.methods import score_distillation as sd


def _members(n=3, hidden=16):
    torch.manual_seed(0)
    return [nets.build("mlp-2d", (2,), hidden=hidden) for _ in range(n)]


def test_ensemble_equals_its_members_forward_features_and_gradients():
    ms = _members()
    ens = nets.Ensemble(copy.deepcopy(ms))
    x, t = torch.randn(3 * 8, 2), torch.rand(3 * 8)
    out = ens(x, t)
    parts = [m(x[8 * i : 8 * i + 8], t[8 * i : 8 * i + 8]) for i, m in enumerate(ms)]
    assert torch.allclose(out, torch.cat(parts), atol=1e-6)
    feats = ens.features(x, t)
    assert torch.allclose(feats[:8], ms[0].features(x[:8], t[:8]), atol=1e-6)
    out.pow(2).mean().backward()
    (parts[1].pow(2).mean() / 3).backward()  # the mean over members scales by 1/3
    g_ens = ens.params["inp__weight"].grad[1]
    assert torch.allclose(g_ens, ms[1].inp.weight.grad, atol=1e-6)
    member = ens.member(2)
    assert torch.allclose(member(x[16:], t[16:]), parts[2], atol=1e-6)
    with pytest.raises(ValueError, match="does not split"):
        ens(torch.randn(10, 2), torch.rand(10))


def test_distillation_never_mixes_members():
    """A DMD2 step (fake score, GAN critic with its per-member head, generator) on an
    ensemble: changing one member's weights changes no other member's gradients."""
    exact = teachers.GaussianMixtureTeacher.eight_gaussians()

    def grads(perturb):
        torch.manual_seed(1)
        G = sd.Generator(nets.Ensemble(_members(2)))
        model = sd.Distiller(G, nets.Ensemble(_members(2)), (2,), discriminator=True)
        assert isinstance(model.disc.head, nets.Ensemble) and model.disc.head.members == 2
        if perturb:
            with torch.no_grad():
                for p in model.generator.net.params.values():
                    p[1] += 0.5
        recipe = sd.Recipe(gan_gen=0.1, gan_critic=0.1, divergence="js")
        x_real = torch.randn(2 * 16, 2)
        g = torch.Generator().manual_seed(3)
        loss, _ = sd.loss_fn(recipe, exact, model, x_real, g, step=0)
        model.zero_grad()
        loss.backward()
        return {n: p.grad[0].clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), f"member 0's {name} saw member 1"
