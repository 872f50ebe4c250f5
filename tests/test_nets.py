import pytest
import torch

from osdlib import nets


def test_mlp_shapes_and_conditioning():
    net = nets.build("mlp-2d", (2,))
    assert net(torch.randn(7, 2), torch.rand(7)).shape == (7, 2)
    cond = nets.build("mlp-digits", (1, 8, 8), num_classes=10)
    x = torch.randn(5, 1, 8, 8)
    assert cond(x, torch.rand(5), torch.arange(5)).shape == x.shape
    assert 0.5e6 < nets.count_parameters(cond) < 1.0e6  # a sub-million-parameter MLP
    with pytest.raises(ValueError, match="pass labels y"):
        cond(x, torch.rand(5))
    # a scalar time broadcasts over the batch
    assert cond(x, torch.tensor(0.3), torch.arange(5)).shape == x.shape


def test_unet_presets():
    net = nets.build("unet-ci", (3, 16, 16), num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    assert net(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape
    uncond = nets.build("unet-ci", (1, 8, 8))
    assert uncond(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_cifar_preset_has_the_ddpm_size():
    n = nets.count_parameters(nets.build("unet-cifar", (3, 32, 32)))
    assert 35.0e6 < n < 36.5e6, n


def test_unknown_net():
    with pytest.raises(ValueError, match="mlp-2d, mlp-digits, mlp-digits-small, unet-ci"):
        nets.build("resnet", (2,))


def test_classifier_features():
    clf = nets.SmallClassifier(3, 10, width=16)
    x = torch.randn(4, 3, 32, 32)
    assert clf(x).shape == (4, 10) and clf.features(x).shape == (4, 128)
