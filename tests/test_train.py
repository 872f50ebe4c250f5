import pytest
import torch

from osdlib import data, nets, train
from osdlib.methods import flow_matching


def _run(steps, ckpt, ckpt_every=0, resume=True):
    torch.manual_seed(123)  # the same initial weights in every run
    net = nets.build("mlp-2d", (2,), hidden=32)
    return flow_matching.train_2d(
        net,
        data.toy("moons"),
        steps=steps,
        batch=64,
        lr=1e-2,
        ema_decay=0.9,
        seed=7,
        ckpt_path=ckpt,
        ckpt_every=ckpt_every,
        resume=resume,
        progress=False,
        log_every=5,
    )


def test_resume_gives_identical_weights(tmp_path):
    full = _run(30, tmp_path / "full.pt")
    # an "interrupted" run: stop at 10 steps, then resume to 30 from its checkpoint
    _run(10, tmp_path / "part.pt")
    resumed = _run(30, tmp_path / "part.pt")
    assert resumed.resumed_from == 10
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert full.history["loss"] == resumed.history["loss"]
    state = train.load_checkpoint(tmp_path / "full.pt")
    assert state["step"] == 30
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    net = nets.build("mlp-2d", (2,), hidden=16)
    ckpt = tmp_path / "c.pt"

    def loss_fn(model, batch, g):
        loss = flow_matching.loss(model, batch, generator=g)
        return loss * float("nan") if loss_fn.calls >= 7 else loss

    def counting(model, batch, g):
        out = loss_fn(model, batch, g)
        loss_fn.calls += 1
        return out

    loss_fn.calls = 0
    with pytest.raises(FloatingPointError, match="step 7.*last good checkpoint"):
        train.train(
            net,
            counting,
            lambda g: data.toy("moons")(32, generator=g),
            20,
            ckpt_path=ckpt,
            ckpt_every=5,
            progress=False,
        )
    assert train.load_checkpoint(ckpt)["step"] == 5


def test_ema_and_extra_metrics():
    net = nets.build("mlp-2d", (2,), hidden=16)

    def loss_fn(model, batch, g):
        loss = flow_matching.loss(model, batch, generator=g)
        return loss, {"double": 2 * loss.item()}

    res = train.train(
        net,
        loss_fn,
        lambda g: data.toy("moons")(32, generator=g),
        10,
        ema_decay=0.5,
        progress=False,
        log_every=5,
    )
    assert res.history["step"] == [5, 10]
    assert res.history["double"] == pytest.approx([2 * v for v in res.history["loss"]])
    assert any(not torch.equal(a, b) for a, b in zip(res.model.parameters(), res.ema.parameters()))


def test_save_and_load_weights(tmp_path):
    net = nets.build("mlp-2d", (2,), hidden=16)
    train.save_weights(net, tmp_path / "w.safetensors")
    other = train.load_weights(nets.build("mlp-2d", (2,), hidden=16), tmp_path / "w.safetensors")
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def _ddp_worker(rank, world, port, out_dir):
    import os

    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    net = nets.build("mlp-2d", (2,), hidden=16)
    res = flow_matching.train_2d(
        net,
        data.toy("moons"),
        steps=6,
        batch=32,
        seed=0,
        progress=False,
        ckpt_path=f"{out_dir}/ddp.pt",
    )
    # the averaging itself: means over the ranks, a rank without a gradient counts as zero
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))
    b.grad = torch.full((2,), 4.0) if rank == 1 else None
    train._average_gradients([a, b], world)
    assert torch.equal(a.grad, torch.full((3,), 1.5)) and torch.equal(b.grad, torch.full((2,), 2.0))
    # a loss that calls its model's parts, as the distillation losses do (m.generator): the
    # gradients are still averaged, and a part no rank uses keeps no gradient
    parts = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "unused": torch.nn.Linear(2, 2)})
    unused = [p.detach().clone() for p in parts["unused"].parameters()]
    run = train.train(
        parts,
        lambda m, b, g: (m["used"](b) - b.flip(1)).pow(2).mean(),
        lambda g: torch.randn(16, 2, generator=g),
        steps=4,
        seed=0,
        progress=False,
    )
    assert all(p.grad is None for p in run.model["unused"].parameters())
    if rank == 0:  # rank 0's weights are everyone's starting point; unused ones stay put
        assert all(torch.equal(a, b) for a, b in zip(unused, run.model["unused"].parameters()))
    # the VQ tokenizer restarts unused codes from each rank's own batch: the ranks must agree
    from osdlib import autoregressive

    images = data.ImageData(
        "noise", torch.rand(64, 1, 8, 8) * 2 - 1, torch.zeros(64, dtype=torch.long)
    )
    tok = autoregressive.VQTokenizer(1, codes=16, code_dim=2, hidden=8, restart_after=1)
    vq = autoregressive.train_tokenizer(tok, images, steps=3, batch=8, seed=0, progress=False)
    assert vq.model.idle.max() <= 1  # codes were restarted
    weights = [p.detach() for m in (res.model, run.model, vq.model) for p in m.parameters()]
    torch.save(weights, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_the_same_call_trains_under_ddp(tmp_path):
    """Two gloo processes on the CPU: ranks see different data but end with equal weights
    (rank 0's initial ones, then the same averaged gradients)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.allclose(x, y) for x, y in zip(a, b))
    assert train.load_checkpoint(tmp_path / "ddp.pt")["step"] == 6  # rank 0 wrote it


def test_history_averages_each_value_over_the_steps_that_report_it():
    net = torch.nn.Linear(1, 1)

    def loss_fn(m, batch, g, step):
        loss = m(batch).pow(2).mean()
        return loss, ({"sometimes": 3.0} if step % 2 == 0 else {})

    run = train.train(net, loss_fn, lambda g: torch.ones(4, 1), 10, log_every=10, progress=False)
    assert run.history["sometimes"] == [3.0]  # not 1.5: five reports in ten steps


def test_max_seconds_stops_early_and_says_how_far_it_got(tmp_path):
    import time

    net = nets.build("mlp-2d", (2,), hidden=16)

    def slow_loss(model, batch, g):
        time.sleep(0.02)
        return flow_matching.loss(model, batch, generator=g)

    result = train.train(
        net,
        slow_loss,
        lambda g: data.toy("moons")(32, generator=g),
        steps=10_000,
        max_seconds=0.3,
        progress=False,
        log_every=1000,
        ckpt_path=tmp_path / "c.pt",
    )
    assert result.stopped_early
    assert 3 <= result.steps < 100
    assert result.history["step"] == [result.steps]  # the partial logging interval is kept
    assert train.load_checkpoint(tmp_path / "c.pt")["step"] == result.steps
    # without a cap the same call runs every step
    full = train.train(
        net, slow_loss, lambda g: data.toy("moons")(32, generator=g), steps=5, progress=False
    )
    assert not full.stopped_early and full.steps == 5
