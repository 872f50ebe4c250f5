import pytest
import torch

from osdlib import data, generators, profiles, teachers


@pytest.fixture(scope="module")
def teacher_and_data():
    settings = profiles.resolve("foundations", "ci")
    images = data.load(settings.image_data)
    teacher, _ = teachers.get_teacher(settings, images, progress=False)
    return settings, teacher, images


@pytest.mark.parametrize("kind", list(generators.KINDS))
def test_each_generator_trains_once_then_loads_from_the_cache(kind, teacher_and_data, tmp_path):
    settings, teacher, images = teacher_and_data
    kw = dict(scale=0.1, root=tmp_path, progress=False)
    G, info = generators.get(kind, teacher, settings, images, "ci", **kw)
    assert info["trained_now"] and not any(p.requires_grad for p in G.parameters())
    z = torch.randn(4, *images.shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    x = G(z, y)
    assert x.shape == z.shape and torch.isfinite(x).all()
    G2, info2 = generators.get(kind, teacher, settings, images, "ci", **kw)
    assert not info2["trained_now"] and info2["steps"] == info["steps"]
    assert torch.equal(G2(z, y), x)
    # another recipe (scale) is another cache entry
    assert generators.spec(kind, settings, "ci", 0.2, None) != generators.spec(
        kind, settings, "ci", 0.1, None
    )


def test_one_step_is_differentiable_in_z(teacher_and_data):
    settings, teacher, images = teacher_and_data
    G = generators.OneStep(teacher.net, "dmd2").requires_grad_(False)
    z = torch.randn(2, *images.shape, requires_grad=True)
    (g,) = torch.autograd.grad(G(z, torch.tensor([1, 2])).sum(), z)
    assert g.abs().sum() > 0


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds"):
        generators.recipe("gan", "ci")
