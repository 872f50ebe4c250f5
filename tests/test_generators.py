import copy
import json

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
    assert info2["made_by"].startswith("osdlib.generators")
    # another recipe (scale) is another cache entry
    assert generators.spec(kind, settings, generators.recipe(kind, "ci", 0.1), 0) != (
        generators.spec(kind, settings, generators.recipe(kind, "ci", 0.2), 0)
    )


def test_a_chapters_generator_is_what_get_loads(teacher_and_data, tmp_path):
    # chapter 04 trains DMD2 with its own settings and puts it; chapter 05 asks for the
    # same recipe and loads that network instead of training another
    from osdlib.methods import score_distillation as sd

    settings, teacher, images = teacher_and_data
    chapter = profiles.resolve("dmd2", "ci", overrides={"steps": 2, "batch": 4})
    model = sd.Distiller(
        sd.Generator(copy.deepcopy(teacher.net)),
        copy.deepcopy(teacher.net),
        images.shape,
        images.num_classes,
        discriminator=True,
    )
    recipe = sd.Recipe(
        gen_every=chapter.ttur, gan_gen=chapter.gan_gen, gan_critic=chapter.gan_critic
    )
    run = sd.distill(
        recipe,
        teacher,
        model,
        lambda g: images.batch(4, generator=g),
        2,
        progress=False,
    )
    generators.put("dmd2", [run], chapter, settings, "chapter 04", root=tmp_path)
    over = {"steps": 2, "batch": 4}
    G, info = generators.get(
        "dmd2", teacher, settings, images, "ci", root=tmp_path, overrides=over, progress=False
    )
    assert not info["trained_now"] and info["made_by"] == "chapter 04" and info["steps"] == [2]
    z, y = torch.randn(3, *images.shape), torch.arange(3)
    with torch.no_grad():
        assert torch.equal(G(z, y), generators.OneStep(run.ema.generator.net, "dmd2")(z, y))
    # the same recipe at another seed, or under a time cap on another device, is another entry
    kw = dict(root=tmp_path, overrides=over, progress=False)
    seed1 = profiles.resolve("dmd2", "ci", seed=1, overrides={"steps": 2, "batch": 4})
    generators.put("dmd2", [run], seed1, settings, "chapter 04", root=tmp_path)
    capped = chapter | {"image_seconds": 60, "device": "cpu"}
    generators.put("dmd2", [run], capped, settings, "chapter 04", root=tmp_path)
    assert len(list((tmp_path / "generators").iterdir())) == 3
    on_cpu = generators.get("dmd2", teacher, settings, images, "ci", max_seconds=60, **kw)[1]
    assert on_cpu["made_by"] == "chapter 04"
    gpu = capped | {"device": "cuda"}  # only the key is compared: nothing runs there
    assert generators.recipe_of("dmd2", gpu) != generators.recipe_of("dmd2", capped)
    assert "device" not in generators.recipe_of("dmd2", chapter)  # no cap: any device
    # another recipe does not find it
    other = generators.get(
        "dmd2",
        teacher,
        settings,
        images,
        "ci",
        root=tmp_path,
        overrides=over,
        max_seconds=1,
        progress=False,
    )[1]
    assert other["trained_now"]
    with pytest.raises(ValueError, match="valid kinds"):
        generators.put("gan", [run], chapter, settings, "chapter 04", root=tmp_path)


def test_a_generator_of_another_teacher_is_made_again(tmp_path):
    """The key holds the teacher's settings; a teacher trained again under them (other images,
    changed code) is another network, and what was distilled from the old one is not loaded."""
    settings = profiles.resolve("foundations", "ci", overrides={"image_steps": 5})
    images = data.load(settings.image_data)
    teacher, _ = teachers.get_teacher(settings, images, root=tmp_path, progress=False)
    kw = dict(root=tmp_path, overrides={"ect_steps": 2, "batch": 4}, progress=False)
    chapter = profiles.resolve("consistency", "ci", overrides=kw["overrides"])
    G, info = generators.get("ect", teacher, settings, images, "ci", **kw)
    assert info["trained_now"]
    assert not generators.get("ect", teacher, settings, images, "ci", **kw)[1]["trained_now"]
    # what a chapter puts names the cached teacher it was distilled from
    run = type("Run", (), {"ema": type("E", (), {"net": G.net})(), "steps": 2, "wall_s": 0.1})
    run.stopped_early = False
    generators.put("ect", [run], chapter, settings, "chapter 02", root=tmp_path)
    (folder,) = (tmp_path / "generators").iterdir()
    stored = json.loads((folder / "info.json").read_text())["teacher_digest"]
    assert stored == teachers.weights_digest(teacher.net)
    # the same settings, another teacher: trained again
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.net.parameters()).add_(1e-3)
    assert generators.get("ect", other, settings, images, "ci", **kw)[1]["trained_now"]


def test_one_step_is_differentiable_in_z(teacher_and_data):
    settings, teacher, images = teacher_and_data
    G = generators.OneStep(teacher.net, "dmd2").requires_grad_(False)
    z = torch.randn(2, *images.shape, requires_grad=True)
    (g,) = torch.autograd.grad(G(z, torch.tensor([1, 2])).sum(), z)
    assert g.abs().sum() > 0


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds"):
        generators.recipe("gan", "ci")
    with pytest.raises(KeyError, match="unknown recipe setting"):
        generators.recipe("ect", "ci", overrides={"ect_step": 3})
    # a coupling setting is known to every kind and changes only 2-RF's recipe
    assert generators.recipe("ect", "ci", overrides={"fp16_pairs": False}) == generators.recipe(
        "ect", "ci"
    )
    assert not generators.recipe("2-rf-distilled", "ci", overrides={"fp16_pairs": False})[
        "fp16_pairs"
    ]
