import math

import pytest
import torch

from osdlib import losses


def test_pseudo_huber_on_the_whole_vector():
    a, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0] = 3.0
    b[0, 1, 0, 0] = 4.0
    c = losses.pseudo_huber_c(48)
    assert c == pytest.approx(0.00054 * math.sqrt(48))
    d = losses.pseudo_huber(a, b)
    assert d[0].item() == pytest.approx(
        math.sqrt(25 + c**2) - c, rel=1e-6
    )  # ||.||=5, not per pixel
    assert d[1].item() == 0.0
    assert losses.l2(a, b)[0].item() == pytest.approx(25 / 48)
    with pytest.raises(ValueError, match="l2, pseudo_huber, lpips"):
        losses.distance("l1")


@pytest.fixture
def lpips_without_download(monkeypatch):
    """LPIPS with randomly initialised VGG16 and heads instead of the downloaded weights."""
    import torch_fidelity.sample_similarity_lpips as tf_lpips
    import torchvision

    def heads(url, **kwargs):
        gen = torch.Generator().manual_seed(0)
        chns = (64, 128, 256, 512, 512)
        return {
            f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
            for i, c in enumerate(chns)
        }

    monkeypatch.setattr(tf_lpips, "load_state_dict_from_url", heads)
    monkeypatch.setattr(
        tf_lpips,
        "torchvision_load_pretrained_vgg16",
        lambda: torchvision.models.vgg16(weights=None),
    )


def test_lpips_is_a_per_sample_distance_with_gradients(lpips_without_download):
    torch.manual_seed(0)
    lpips = losses.distance("lpips")
    a = torch.rand(2, 3, 8, 8, requires_grad=True)
    b = torch.rand(2, 3, 8, 8)
    d = lpips(a * 2 - 1, b * 2 - 1)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert a.grad.abs().sum() > 0  # a student trains through it; the VGG stays frozen
    assert not any(p.requires_grad for p in lpips.parameters())
    assert lpips(b, b).abs().max() == 0
    gray = torch.rand(2, 1, 8, 8)
    assert lpips(gray, gray.flip(0)).shape == (2,)  # one channel is repeated to RGB


def test_lpips_follows_its_inputs_device(lpips_without_download):
    # the training loop runs on the GPU and takes the distance as distance() made it, on
    # the CPU; the meta device stands in for the GPU here
    lpips = losses.distance("lpips")
    d = lpips(torch.zeros(2, 3, 8, 8, device="meta"), torch.zeros(2, 3, 8, 8, device="meta"))
    assert d.device.type == "meta" and next(lpips.parameters()).device.type == "meta"


def test_lpips_without_internet_says_what_to_do(monkeypatch):
    import urllib.error

    import torch_fidelity.sample_similarity_lpips as tf_lpips

    def offline(url, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_lpips, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="download failed.*l2, pseudo_huber"):
        losses.distance("lpips")
