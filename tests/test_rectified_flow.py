import numpy as np
import pytest
import torch

from osdlib import data, metrics, nets, teachers
from osdlib.methods import flow_matching
from osdlib.methods import rectified_flow as rf

M = torch.tensor([3.0, -2.0])


def to_point(x, t, y=None):
    """The exact velocity of straight paths from any z to the single point M."""
    return (x - M) / t.reshape(-1, 1)


class Field(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        return self.fn(x, t, y) + 0 * self.dummy


def test_straightness_zero_for_straight_paths_positive_for_curved():
    z = torch.randn(256, 2)
    assert metrics.straightness(to_point, z, steps=20) < 1e-10
    curved = lambda x, t, y=None: torch.stack([x[:, 1], -x[:, 0]], 1)  # noqa: E731 (a rotation)
    assert metrics.straightness(curved, z, steps=50) > 0.05


def test_pairs_on_disk_round_trip(tmp_path):
    teacher = teachers.FlowTeacher(Field(to_point), (2,))
    pairs = rf.generate_pairs(
        teacher, 250, tmp_path / "p", steps=3, batch=100, num_classes=5, fp16=True, progress=False
    )
    assert len(pairs) == 250 and isinstance(pairs.x, np.memmap) and pairs.x.dtype == np.float16
    assert np.allclose(np.asarray(pairs.x, dtype=np.float32), M.numpy(), atol=2e-3)
    assert np.bincount(np.asarray(pairs.y)).tolist() == [50] * 5
    x, z, y = pairs.batch(32, torch.Generator().manual_seed(0))
    assert x.shape == z.shape == (32, 2) and x.dtype == torch.float32 and y.shape == (32,)
    reopened = rf.PairSet(tmp_path / "p")
    assert np.array_equal(np.asarray(reopened.z), np.asarray(pairs.z))


def test_distill_and_reflow_losses_vanish_on_exact_straight_coupling():
    z = torch.randn(64, 2)
    x = M.expand(64, 2)
    net = Field(to_point)
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        assert rf.distill_loss(net, x, z, generator=g, k=k).item() < 1e-10
    assert rf.reflow_loss(net, x, z, generator=g).item() < 1e-10
    assert torch.allclose(rf.one_step(net, z), x, atol=1e-6)
    assert set(rf.grid_times(4, 400, g).unique().tolist()) == {0.25, 0.5, 0.75, 1.0}


def test_flow_guided_loss_zero_when_student_is_the_teachers_exact_one_step():
    z = torch.randn(64, 2)
    teacher, student = Field(to_point), Field(to_point)
    assert rf.flow_guided_loss(student, teacher, z).item() < 1e-10
    shifted = Field(lambda x, t, y=None: to_point(x, t) + 0.5)
    assert rf.flow_guided_loss(shifted, teacher, z).item() > 0.1


def test_annealed_noise_endpoints():
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rf.annealed_noise(z, 0.0), z)
    e = rf.annealed_noise(z, 1.0, torch.Generator().manual_seed(1))
    assert abs(torch.corrcoef(torch.stack([z[:, 0], e[:, 0]]))[0, 1]) < 0.03
    mid = rf.annealed_noise(z, 0.6, torch.Generator().manual_seed(1))
    assert mid.std().item() == pytest.approx(1.0, abs=0.03)  # stays N(0, I)


class _Pairs:
    def batch(self, n, generator=None):
        return torch.randn(n, 2), torch.randn(n, 2), None


class _Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t, y=None):
        return self.lin(torch.cat([x, t.reshape(-1, 1).expand(len(x), 1)], 1))


def test_annealing_follows_the_steps_or_under_a_cap_the_clock(monkeypatch):
    import time

    seen = []
    real = rf.annealed_noise
    monkeypatch.setattr(rf, "annealed_noise", lambda z, b, g=None: seen.append(b) or real(z, b, g))
    rf.train_annealing_reflow(_Velocity(), _Pairs(), steps=10, batch=4, progress=False)
    assert seen == pytest.approx([1 - i / 10 for i in range(10)])
    # a cap that stops the run long before its planned steps: b must still reach about 0
    clock = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: 0.01 * next(clock))
    seen.clear()
    run = rf.train_annealing_reflow(
        _Velocity(), _Pairs(), steps=10**6, batch=4, max_seconds=1.0, progress=False
    )
    assert run.stopped_early and 5 < len(seen) < 1000
    assert seen[0] > 0.9 and min(seen) < 0.1
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))


def test_reflow_straightens_and_fixes_one_step_on_8_gaussians(tmp_path):
    """The chapter's claim at a small size: 2-RF paths are much straighter than 1-RF's, and
    one Euler step of 2-RF is much closer to the data."""
    torch.manual_seed(0)
    toy = data.toy("8gaussians")
    kw = dict(batch=256, lr=3e-3, grad_clip=None, progress=False, seed=0)
    one = flow_matching.train_2d(nets.build("mlp-2d", (2,), hidden=64), toy, steps=1000, **kw)
    rf1 = teachers.FlowTeacher(one.ema, (2,))
    pairs = rf.generate_pairs(rf1, 10_000, tmp_path / "pairs", steps=30, batch=5000, progress=False)
    net2 = nets.build("mlp-2d", (2,), hidden=64)
    net2.load_state_dict(one.ema.state_dict())
    two = rf.train_reflow(net2, pairs, steps=1000, **kw)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    s1 = metrics.straightness(one.ema, z, steps=50)
    s2 = metrics.straightness(two.ema, z, steps=50)
    assert s2 < 0.5 * s1, (s1, s2)
    ref = toy(4000, generator=torch.Generator().manual_seed(2))
    swd1 = metrics.sliced_wasserstein(rf1.sample(4000, steps=1, z=z).x, ref)
    swd2 = metrics.sliced_wasserstein(
        teachers.FlowTeacher(two.ema, (2,)).sample(4000, steps=1, z=z).x, ref
    )
    assert swd2 < 0.5 * swd1, (swd1, swd2)
