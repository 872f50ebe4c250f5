"""The text-to-image ReNO path end to end on tiny random diffusers/transformers components."""

import pytest
import torch

pytest.importorskip("transformers")

from osdlib import t2i  # noqa: E402
from osdlib.methods import reno as rn  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return t2i.tiny_components(seed=0)


def test_one_step_is_the_x0_estimate_of_the_last_timestep(tiny):
    G, _, _ = tiny
    c = G.encode(["a red cube", "a cat"])
    z = torch.randn(2, *G.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 999)
    with torch.no_grad():
        eps = G.unet(z, t, encoder_hidden_states=c).sample
        a = G.alpha
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        expected = G.vae.decode(x0 / G.scaling_factor).sample.clamp(-1, 1)
        assert torch.allclose(G(z, c), expected, atol=1e-5)
    assert G(z, c).shape == (2, 3, 16, 16)
    assert abs(float(a) - 0.0047) < 1e-3  # SD's alpha-bar at t = 999


def test_clip_reward_is_the_scaled_cosine(tiny):
    G, clip, tokenize = tiny
    reward = t2i.CLIPReward(clip, tokenize, ["a red cube"], scale=100.0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    r = reward(x)
    assert r.shape == (3,) and (r.abs() <= 100.0 + 1e-4).all()
    pick = t2i.CLIPReward(clip, tokenize, ["a red cube"], scale=None)
    assert torch.allclose(pick(x) / pick.scale, r / 100.0, atol=1e-5)


def test_clip_reward_checkpoints_its_vision_tower(tiny):
    """Same value and gradient with and without checkpointing; checkpointed, the vision tower
    runs again in the backward pass (it kept no activations), although the model is frozen
    in eval mode (where transformers' own checkpointing switch does nothing)."""
    _, clip, tokenize = tiny
    calls = []
    hook = clip.vision_model.register_forward_hook(lambda *a: calls.append(1))
    grads, values = [], []
    try:
        for checkpoint in (False, True):
            reward = t2i.CLIPReward(clip, tokenize, ["a red cube"], checkpoint=checkpoint)
            assert not clip.training
            x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
            x.requires_grad_(True)
            calls.clear()
            value = reward(x)
            value.sum().backward()
            assert len(calls) == (2 if checkpoint else 1)
            grads.append(x.grad)
            values.append(value.detach())
    finally:
        hook.remove()
    assert torch.allclose(values[0], values[1]) and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reno_runs_on_the_tiny_t2i_stack_and_raises_the_reward(tiny):
    G, clip, tokenize = tiny
    prompts = ["a red cube on a blue sphere", "two dogs"]
    c = G.encode(prompts)
    rewards = [
        (t2i.CLIPReward(clip, tokenize, prompts, scale=100.0), 0.01),
        (t2i.CLIPReward(clip, tokenize, prompts, scale=None, name="PickScore-like"), 0.05),
    ]
    z = torch.randn(2, *G.latent_shape, generator=torch.Generator().manual_seed(1))
    params = [p.clone() for p in G.parameters()]
    out = rn.reno(G, z, c, rewards, steps=8, lr=5.0, clip=0.1 * (256 / 16384) ** 0.5)
    assert (out.reward > out.initial_reward).all()
    assert out.x.shape == (2, 3, 16, 16)
    assert all(torch.equal(p, q) for p, q in zip(params, G.parameters(), strict=True))  # frozen
    assert all(p.grad is None for p in G.parameters())


def test_loading_without_weights_says_so(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    import transformers

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(t2i.WeightsUnavailable, match="could not load"):
        t2i.load_clip_reward(["x"], device="cpu")


def test_missing_packages_are_named(monkeypatch):
    import sys

    assert t2i.missing_packages() == []  # the test environment installs the t2i extra
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert t2i.missing_packages() == ["transformers"]


def test_without_the_hub_only_the_local_cache_is_asked(monkeypatch):
    import transformers

    from osdlib import data

    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: False)
    with pytest.raises(t2i.WeightsUnavailable, match="not in the Hugging Face cache"):
        t2i.load_clip_reward(["x"], device="cpu")
    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: True)
    with pytest.raises(t2i.WeightsUnavailable):
        t2i.load_clip_reward(["x"], device="cpu")
    assert asked == [True, False]
