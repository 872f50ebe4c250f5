import torch

from osdlib.autoregressive import ARTransformer, VQTokenizer


def test_kv_cache_gives_the_logits_of_the_full_forward_pass():
    torch.manual_seed(0)
    ar = ARTransformer(vocab=32, length=9, num_classes=10, dim=32, depth=2, heads=4).eval()
    y = torch.tensor([3, 7])
    tokens = torch.randint(0, 32, (2, 9))
    full = ar(tokens, y)  # (2, 9, 32)
    caches = [{} for _ in ar.blocks]
    h = ar.cls(y)[:, None]
    step_logits = []
    for i in range(9):
        step_logits.append(ar.run(h, start=i, caches=caches)[:, -1])
        h = ar.tok(tokens[:, i])[:, None]
    assert torch.allclose(torch.stack(step_logits, 1), full, atol=1e-5)
    # a prefix of 4 positions at once, then the other 5 at once on top of its cache
    caches = [{} for _ in ar.blocks]
    h = ar.inputs(tokens[:, :8], y)  # class, tok_1 .. tok_8
    first = ar.run(h[:, :4], start=0, caches=caches)
    rest = ar.run(h[:, 4:], start=4, caches=caches)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_generation_with_and_without_cache_agree():
    torch.manual_seed(1)
    ar = ARTransformer(vocab=16, length=6, num_classes=4, dim=32, depth=2, heads=2).eval()
    y = torch.arange(4)

    def greedy(logits, i):
        return logits.argmax(-1)

    a = ar.generate(y, choose=greedy)
    b = ar.generate(y, choose=greedy, use_cache=False)
    assert torch.equal(a, b) and a.shape == (4, 6)
    g = torch.Generator().manual_seed(0)
    s = ar.generate(y, generator=g, top_k=3)
    assert s.shape == (4, 6) and s.max() < 16


def test_causality_the_future_does_not_change_the_past():
    torch.manual_seed(2)
    ar = ARTransformer(vocab=16, length=8, num_classes=3, dim=32, depth=2, heads=2).eval()
    y = torch.tensor([0, 1])
    t = torch.randint(0, 16, (2, 8))
    t2 = t.clone()
    t2[:, 5:] = (t2[:, 5:] + 1) % 16
    assert torch.allclose(ar(t, y)[:, :6], ar(t2, y)[:, :6], atol=1e-6)


def test_vq_tokenizer_shapes_straight_through_and_restarts():
    torch.manual_seed(3)
    tok = VQTokenizer(channels=1, codes=16, code_dim=4, hidden=16, downsample=2, restart_after=1)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    before = tok.codebook.detach().clone()
    with torch.no_grad():
        index0 = tok.encode(x)
    unused = torch.ones(16, dtype=torch.bool)
    unused[index0.flatten()] = False
    assert unused.any()  # a random codebook leaves codes unused
    recon, index, losses = tok(x)  # training mode: idle codes (1 step) are restarted
    assert torch.equal(index, index0)
    assert recon.shape == x.shape and index.shape == (8, 4, 4)
    after = tok.codebook.detach()
    assert torch.equal(after[~unused], before[~unused])
    z = tok.encoder(x).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    exact = torch.cdist(after[unused], z, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-6  # each restarted code is one encoder output
    losses["total"].backward()
    assert tok.encoder[0].weight.grad.abs().sum() > 0  # the straight-through estimator
    assert tok.codebook.grad.abs().sum() > 0
    assert tok.decode(index).shape == x.shape
    assert torch.equal(tok.decode(index.flatten(1)), tok.decode(index))
