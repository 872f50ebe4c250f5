import numpy as np
import pytest
import torch

from osdlib.methods import distilled_decoding as dd


def _problem(k=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(k, d, generator=g)
    p = torch.softmax(2 * torch.randn(k, generator=g), 0)
    return codes, p


def test_the_map_preserves_the_categorical_distribution():
    codes, p = _problem()
    n = 100_000
    eps = torch.randn(n, codes.shape[1], generator=torch.Generator().manual_seed(1))
    logp = p.log().expand(n, -1)
    index, end = dd.map_tokens(eps, logp, codes, steps=100)
    freq = torch.bincount(index, minlength=len(p)).double() / n
    assert (freq - p.double()).abs().max() < 0.01
    # the end point is (almost) the code it names
    assert (end - codes[index]).norm(dim=1).median() < 1e-3


def test_the_map_is_deterministic():
    codes, p = _problem(seed=2)
    eps = torch.randn(500, codes.shape[1], generator=torch.Generator().manual_seed(3))
    a, _ = dd.map_tokens(eps, p.log().expand(500, -1), codes, steps=50)
    b, _ = dd.map_tokens(eps.clone(), p.log().expand(500, -1), codes, steps=50)
    assert torch.equal(a, b)


def test_few_steps_bias_the_frequencies():
    codes, p = _problem(seed=4)
    n = 50_000
    eps = torch.randn(n, codes.shape[1], generator=torch.Generator().manual_seed(5))
    logp = p.log().expand(n, -1)

    def error(steps):
        index, _ = dd.map_tokens(eps, logp, codes, steps=steps)
        return float((torch.bincount(index, minlength=len(p)).double() / n - p).abs().max())

    assert error(1) > 2 * error(100)
    assert error(2) > error(100)


def test_velocity_in_closed_form_for_one_code():
    """With one code the posterior is certain: v = (c - x) / (1 - t), the straight line."""
    c = torch.tensor([[1.0, -2.0]])
    x = torch.tensor([[0.3, 0.4]])
    v = dd.velocity(x, 0.25, torch.zeros(1, 1), c)
    assert torch.allclose(v, (c - x) / 0.75)


def test_top_k_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    logp = dd.process_logits(logits, temperature=0.5, top_k=2)
    assert torch.isinf(logp[0, 2:]).all() and torch.isclose(
        logp[0, :2].exp().sum(), torch.tensor(1.0)
    )
    expected = torch.log_softmax(torch.tensor([4.0, 2.0]), 0)
    assert torch.allclose(logp[0, :2], expected)
    # codes outside the top-k are never reached
    codes = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2000, 3, generator=torch.Generator().manual_seed(1))
    index, _ = dd.map_tokens(eps, logp.expand(2000, -1), codes, steps=20)
    assert index.max() <= 1


def _tiny_ar(seed=0, vocab=8, length=6):
    from osdlib.autoregressive import ARTransformer

    torch.manual_seed(seed)
    return ARTransformer(vocab=vocab, length=length, num_classes=3, dim=32, depth=2, heads=2).eval()


def test_map_sequence_is_deterministic_and_starts_with_the_first_position_map():
    ar = _tiny_ar()
    codes = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    eps = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(2))
    a = dd.map_sequence(ar, y, eps, codes, steps=30)
    b = dd.map_sequence(ar, y, eps.clone(), codes, steps=30)
    assert torch.equal(a, b) and a.shape == (4, 6)
    with torch.no_grad():
        first = ar.run(ar.cls(y)[:, None])[:, -1]
    expected, _ = dd.map_tokens(eps[:, 0], dd.process_logits(first), codes, steps=30)
    assert torch.equal(a[:, 0], expected)


def test_student_starts_as_the_teacher_when_every_token_is_known():
    ar = _tiny_ar(3)
    student = dd.Student(ar, code_dim=3)
    y = torch.tensor([1, 2])
    tokens = torch.randint(0, 8, (2, 6))
    eps = torch.randn(2, 6, 3)
    with torch.no_grad():
        assert torch.allclose(student(eps, y, tokens, known=6), ar(tokens, y), atol=1e-6)
    one, two = student.sample(eps, y, steps=1), student.sample(eps, y, steps=2)
    assert one.shape == two.shape == (2, 6)
    assert torch.equal(two[:, :3], one[:, :3])  # the second step keeps the first half
    first_half_known = student(eps, y, one, known=3).argmax(-1)
    assert torch.equal(two[:, 3:], first_half_known[:, 3:])
    with pytest.raises(ValueError, match="1 or 2 steps"):
        student.sample(eps, y, steps=3)


def test_the_dataset_on_disk_is_the_map_of_its_noise(tmp_path):
    """generate_dataset's memory-mapped pairs: z the seed's noise, x its map, y balanced."""
    ar = _tiny_ar(7)
    codes = torch.randn(8, 3, generator=torch.Generator().manual_seed(8))
    pairs = dd.generate_dataset(ar, codes, 10, tmp_path, 3, steps=10, batch=4, progress=False)
    assert len(pairs) == 10 and sorted(p.name for p in tmp_path.glob("*.npy")) == [
        "x.npy",
        "y.npy",
        "z.npy",
    ]
    z, x, y = (torch.from_numpy(np.array(a)) for a in (pairs.z, pairs.x, pairs.y))  # copies
    assert y.tolist() == [i % 3 for i in range(10)]
    g = torch.Generator().manual_seed(0)  # the default seed, drawn in batches of 4
    eps = torch.cat([torch.randn(m, 6, 3, generator=g) for m in (4, 4, 2)])
    assert torch.equal(z, eps)
    assert torch.equal(x.long(), dd.map_sequence(ar, y, eps, codes, steps=10))


def test_naive_marginals_are_the_token_frequencies_and_sampling_follows_them():
    tokens = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 3]])
    labels = torch.tensor([0, 0, 0, 1])
    m = dd.naive_marginals(tokens, labels, vocab=4, num_classes=3)
    assert m.shape == (3, 2, 4)
    assert torch.allclose(m[0, 0], torch.tensor([2, 1, 0, 0]) / 3)
    assert torch.allclose(m[0, 1], torch.tensor([0, 1, 2, 0]) / 3)
    assert torch.equal(m[1, 0], torch.tensor([0.0, 0, 0, 1])) and m[2].sum() == 0  # no samples
    y = torch.zeros(20_000, dtype=torch.long)
    draws = dd.sample_naive(m, y, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[:, 1], minlength=4).float() / len(y)
    assert (freq - m[0, 1]).abs().max() < 0.02


def test_student_learns_a_fixed_map():
    ar = _tiny_ar(4)
    codes = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    y = torch.arange(32) % 3
    eps = torch.randn(32, 6, 3, generator=torch.Generator().manual_seed(6))
    target = dd.map_sequence(ar, y, eps, codes, steps=20)
    student = dd.Student(ar, code_dim=3)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    known = torch.zeros(32, dtype=torch.long)
    first = student.loss(eps, y, target, known).item()
    for _ in range(150):
        opt.zero_grad()
        student.loss(eps, y, target, known).backward()
        opt.step()
    assert student.loss(eps, y, target, known).item() < 0.2 * first
    assert (student.sample(eps, y) == target).float().mean() > 0.9
