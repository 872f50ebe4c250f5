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


# --------------------------------------------------------------------------------------
# HPSv2 and ImageReward, and the loaders' success paths (no download: stand-ins are
# returned where the Hub would be asked)
# --------------------------------------------------------------------------------------


def _reno_pixels(x, size):
    """ReNO's preprocessing, from torchvision: [0, 1], Resize (bicubic, antialiased), CLIP's
    mean and std."""
    from torchvision.transforms import InterpolationMode, Normalize, Resize

    x = (x.clamp(-1, 1) + 1) / 2
    x = Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)(x)
    return Normalize(t2i.CLIP_MEAN, t2i.CLIP_STD)(x)


def test_hps_reward_is_the_cosine_of_open_clip_features_on_renos_preprocessing():
    pytest.importorskip("open_clip")
    model, tokenize = t2i.tiny_open_clip(seed=0)
    prompts = ["a red cube", "two dogs", "a cat"]
    reward = t2i.HPSReward(model, tokenize, prompts)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(_reno_pixels(x, 32)), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenize(prompts)), dim=-1)
        expected = (image * text).sum(-1)
        assert torch.allclose(reward(x), expected, atol=1e-5)
        one = t2i.HPSReward(model, tokenize, ["a cat"])(x)  # one prompt for every image
        text = torch.nn.functional.normalize(model.encode_text(tokenize(["a cat"])), dim=-1)
        assert torch.allclose(one, (image * text).sum(-1), atol=1e-5)
    x.requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class _StandInBLIP(torch.nn.Module):
    """The attributes ImageRewardScore reads from the image-reward package's model, with tiny
    random layers: a patch encoder, a text encoder that attends to the image tokens, an MLP
    head, mean and std. It checks the wiring, not ImageReward's network."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self._build()

    def _build(self):
        blip = torch.nn.Module()
        blip.visual_encoder = torch.nn.Sequential(  # (B, patches, 16) image tokens
            torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.Flatten(2), _Transpose()
        )
        embed = torch.nn.Embedding(100, 16)
        attend = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def tokenizer(prompts, padding, truncation, max_length, return_tensors):
            assert (padding, truncation, return_tensors) == ("max_length", True, "pt")
            rows = [[1 + len(w) for w in p.split()][:max_length] for p in prompts]
            ids = torch.tensor([r + [0] * (max_length - len(r)) for r in rows])
            return type("Tokens", (), {"input_ids": ids, "attention_mask": (ids > 0).long()})

        class TextEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.attend = embed, attend

            def forward(
                self,
                ids,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                return_dict,
            ):
                assert (
                    return_dict and encoder_attention_mask.shape == encoder_hidden_states.shape[:-1]
                )
                h = self.embed(ids) * attention_mask[..., None]
                out, _ = self.attend(h, encoder_hidden_states, encoder_hidden_states)
                return type("Out", (), {"last_hidden_state": h + out})

        blip.text_encoder = TextEncoder()
        blip.tokenizer = tokenizer
        self.blip = blip
        self.mlp = torch.nn.Linear(16, 1)
        self.mean, self.std = 0.167, 1.033

    def expected(self, x, prompts, size):
        """The score of each image alone, with its own prompt (or the one prompt)."""
        scores = []
        for i in range(len(x)):
            tokens = self.blip.tokenizer([prompts[i % len(prompts)]], "max_length", True, 35, "pt")
            image = self.blip.visual_encoder(_reno_pixels(x[i : i + 1], size))
            ones = torch.ones(image.shape[:-1], dtype=torch.long)
            h = self.blip.text_encoder(
                tokens.input_ids, tokens.attention_mask, image, ones, True
            ).last_hidden_state
            scores.append((self.mlp(h[:, 0]).squeeze(-1) - self.mean) / self.std)
        return torch.cat(scores)


def test_image_reward_score_follows_the_packages_model():
    model = _StandInBLIP()
    reward = t2i.ImageRewardScore(model, ["a small red cube"], size=16)
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a cat", "two big brown dogs", "a red cube on a table"]
    with torch.no_grad():  # one prompt for every image, and one prompt per image
        assert torch.allclose(reward(x), model.expected(x, ["a small red cube"], 16), atol=1e-5)
        each = t2i.ImageRewardScore(model, prompts, size=16)
        assert torch.allclose(each(x), model.expected(x, prompts, 16), atol=1e-5)
    x.requires_grad_(True)
    values = []
    for checkpoint in (True, False):
        reward.checkpoint = checkpoint
        x.grad = None
        value = reward(x)
        value.sum().backward()
        values.append((value.detach(), x.grad.clone()))
    assert torch.allclose(values[0][0], values[1][0]) and torch.allclose(
        values[0][1], values[1][1], atol=1e-6
    )


def test_load_hpsv2_builds_the_architecture_and_loads_every_weight(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")
    import huggingface_hub
    import open_clip

    from osdlib import data

    trained, tokenize = t2i.tiny_open_clip(seed=0)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    asked = []

    def download(repo_id, filename, local_files_only=False):
        asked.append((repo_id, filename, local_files_only))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(
        open_clip, "create_model", lambda name, pretrained=None: t2i.tiny_open_clip(seed=1)[0]
    )
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: tokenize)
    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: False)
    reward = t2i.load_hpsv2(["a red cube"], device="cpu", dtype=torch.float32)
    assert asked == [("xswu/HPSv2", "HPS_v2.1_compressed.pt", True)]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(reward(x), t2i.HPSReward(trained, tokenize, ["a red cube"])(x))
    # a checkpoint that holds more than tensors is refused, not unpickled
    import argparse

    torch.save({"state_dict": trained.state_dict(), "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(t2i.WeightsUnavailable, match="holds more than tensors"):
        t2i.load_hpsv2(["a red cube"], device="cpu", dtype=torch.float32)


def test_load_sd_turbo_and_clip_rewards_assemble_the_pieces(monkeypatch, tiny):
    import diffusers
    import transformers

    G, clip, tokenize = tiny
    calls = []

    def pretrained(obj):
        def load(model_id, subfolder="", **kw):
            calls.append((model_id, subfolder, kw.get("torch_dtype"), kw["local_files_only"]))
            return obj

        return load

    sched = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    for cls, obj in [
        (diffusers.UNet2DConditionModel, G.unet),
        (diffusers.AutoencoderKL, G.vae),
        (transformers.CLIPTextModel, G.text_encoder),
        (diffusers.DDPMScheduler, sched),
        (transformers.CLIPModel, clip),
    ]:
        monkeypatch.setattr(cls, "from_pretrained", pretrained(obj))
    monkeypatch.setattr(t2i, "clip_tokenizer", lambda *a, **k: tokenize)
    from osdlib import data

    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: True)
    loaded = t2i.load_sd_turbo(device="cpu")
    assert [c[:2] for c in calls] == [
        ("stabilityai/sd-turbo", s) for s in ("unet", "vae", "text_encoder", "scheduler")
    ]
    assert all(c[2] == torch.float16 for c in calls[:3]) and not any(c[3] for c in calls)
    z = torch.randn(1, *G.latent_shape)
    c = loaded.encode(["a cat"])
    with torch.no_grad():
        assert torch.allclose(loaded(z, c), G(z, c)) and loaded.timestep == 999
    clip_reward = t2i.load_clip_reward(["a cat"], device="cpu")
    pick = t2i.load_pickscore(["a cat"], device="cpu")
    assert calls[-2][0] == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # ReNO's CLIP
    assert calls[-1][0] == "yuvalkirstain/PickScore_v1"
    assert clip_reward.scale == 100.0 and pick.scale == pytest.approx(float(clip.logit_scale.exp()))


def test_load_image_reward_uses_the_package_or_says_how_to_get_it(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(t2i.WeightsUnavailable, match="pip install image-reward"):
        t2i.load_image_reward(["x"], device="cpu")
    from osdlib import data

    model = _StandInBLIP()
    loaded = []

    def load(name, device, download_root=None, med_config=None):
        loaded.append((name, download_root, med_config))
        return model

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: True)
    reward = t2i.load_image_reward(
        ["a cat"], download_root=tmp_path, device="cpu", dtype=torch.float32
    )
    assert loaded == [("ImageReward-v1.0", str(tmp_path), None)]
    assert isinstance(reward, t2i.ImageRewardScore)
    # offline: only the files already downloaded, and their absence said at once
    monkeypatch.setattr(data, "online", lambda host, timeout=3.0: False)
    with pytest.raises(t2i.WeightsUnavailable, match="files are not in"):
        t2i.load_image_reward(["a cat"], download_root=tmp_path, device="cpu")
    for name in ("ImageReward.pt", "med_config.json"):
        (tmp_path / name).write_bytes(b"")
    t2i.load_image_reward(["a cat"], download_root=tmp_path, device="cpu", dtype=torch.float32)
    assert loaded[-1] == (str(tmp_path / "ImageReward.pt"), None, str(tmp_path / "med_config.json"))
