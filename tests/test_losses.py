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
