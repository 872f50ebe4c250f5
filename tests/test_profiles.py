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
