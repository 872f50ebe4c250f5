import pytest

from osdlib import profiles


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="ci, book, gpu, paper and auto"):
        profiles.resolve("foundations", "laptop")


def test_auto_and_env(monkeypatch):
    import torch

    expected = "gpu" if torch.cuda.is_available() else "book"
    assert profiles.resolve("foundations", "auto").profile == expected
    monkeypatch.setenv("OSD_PROFILE", "ci")
    assert profiles.resolve("foundations").profile == "ci"


def test_overrides_and_table():
    s = profiles.resolve("foundations", "ci", seed=3, overrides={"image_steps": 5})
    assert s.image_steps == 5 and s.seed == 3
    assert "image_steps" in s.table() and "| `image_steps` | 5 |" in s._repr_markdown_()
    with pytest.raises(KeyError, match="valid settings are"):
        profiles.resolve("foundations", "ci", overrides={"image_stpes": 5})
    with pytest.raises(ValueError, match="valid chapters"):
        profiles.resolve("nope", "ci")
    with pytest.raises(AttributeError, match="available"):
        _ = s.nothing


def test_profiles_grow():
    sizes = [profiles.resolve("foundations", p).image_steps for p in ("ci", "book")]
    assert sizes[0] < sizes[1]


def test_every_profile_of_a_chapter_has_the_same_settings():
    for chapter, by_profile in profiles.CHAPTERS.items():
        keys = {p: set(s) for p, s in by_profile.items()}
        assert len({frozenset(k) for k in keys.values()}) == 1, (chapter, keys)


def test_gpu_profile_on_a_cpu_machine_and_its_sampling_context():
    import contextlib

    import torch

    s = profiles.resolve("foundations", "gpu")
    if not torch.cuda.is_available():  # a dry run of the gpu settings on the CPU
        assert s.device == "cpu" and s.toy_device == "cpu"
        assert isinstance(profiles.sampling(s), contextlib.nullcontext)
    assert s.fid and s.sample_bf16 and s.image_seconds
    import warnings

    with warnings.catch_warnings():  # "CUDA is not available": only the object is checked
        warnings.simplefilter("ignore")
        bf16 = profiles.sampling({"sample_bf16": True, "device": "cuda"})
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16
    paper = profiles.resolve("foundations", "paper")
    assert not paper.sample_bf16 and paper.image_seconds is None  # the papers' protocol
