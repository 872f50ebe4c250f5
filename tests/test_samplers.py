import pytest
import torch

from osdlib import samplers


def straight_field(m):
    """The exact velocity of the straight paths x_t = (1 - t) m + t z (an affine field)."""
    return lambda x, t, y=None: (x - m) / t[:, None]


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_straight_paths(steps):
    m = torch.tensor([[3.0, -2.0]])
    z = torch.randn(16, 2)
    out = samplers.solve(straight_field(m), z, steps, "euler")
    assert out.nfe == steps
    assert torch.allclose(out.x, m.expand(16, 2), atol=1e-5)


def test_heun_is_exact_for_a_field_linear_in_t_and_counts_nfe():
    c = torch.tensor([1.0, 2.0])

    def v(x, t, y=None):
        return c * t[:, None]  # dx/dt = c t  ->  x(0) = x(1) - c / 2

    x1 = torch.zeros(4, 2)
    heun = samplers.solve(v, x1, 4, "heun")
    assert torch.allclose(heun.x, -c / 2 * torch.ones(4, 2), atol=1e-6)
    assert heun.nfe == 2 * 4
    euler = samplers.solve(v, x1, 4, "euler")
    assert not torch.allclose(euler.x, heun.x, atol=1e-3)  # Euler is first order here


def test_trajectory_and_errors():
    out = samplers.solve(lambda x, t, y=None: x, torch.ones(3, 2), 5, keep_trajectory=True)
    assert len(out.trajectory) == 6
    with pytest.raises(ValueError, match="euler, heun"):
        samplers.solve(lambda x, t, y=None: x, torch.ones(1, 2), 2, solver="rk4")
    with pytest.raises(ValueError):
        samplers.uniform_times(0)
