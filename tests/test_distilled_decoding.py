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
    assert student.sample(eps, y, steps=1).shape == (2, 6)
    assert student.sample(eps, y, steps=2).shape == (2, 6)


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
