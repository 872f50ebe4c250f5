import pytest
import torch

from osdlib import nets, paths, profiles, samplers, teachers


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A tiny randomly initialised DDPM pipeline written in the diffusers layout."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    path = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def test_ddpm_teacher_loads_and_reports_its_range(ddpm_dir):
    t = teachers.DDPMTeacher.from_pretrained(ddpm_dir)
    assert t.shape == (3, 8, 8)
    # linear DDPM schedule: sigma_max = sqrt((1 - abar_T) / abar_T) ~ 157 -> t_max ~ 0.9937
    assert 0.993 < t.t_max < 0.995 and 0 < t.t_min < 0.011
    # fractional timesteps invert the schedule
    abar = t.log_snr.double().sigmoid()
    for k in (0, 10, 500, 999):
        tk = paths.sigma_to_t(paths.alpha_bar_to_sigma(abar[k])).float()
        assert t.timestep(tk.reshape(1)).item() == pytest.approx(k, abs=2e-2)


def test_ddpm_teacher_x0_matches_the_epsilon_model(ddpm_dir):
    t = teachers.DDPMTeacher.from_pretrained(ddpm_dir)
    k = 300
    abar = torch.sigmoid(t.log_snr[k].double())
    x_vp = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eps = t.unet(x_vp, torch.tensor([k, k]).float()).sample
        x0_ref = (x_vp - torch.sqrt(1 - abar).float() * eps) / torch.sqrt(abar).float()
        tk = paths.sigma_to_t(paths.alpha_bar_to_sigma(abar)).float()
        x_t = (1 - tk) * x_vp / torch.sqrt(abar).float()
        x0 = t.x0(x_t, tk.expand(2))
    assert torch.allclose(x0, x0_ref, atol=1e-4)


def test_euler_on_the_converted_ode_reproduces_diffusers_ddim(ddpm_dir):
    """DDIM (eta = 0) is Euler on the linear-interpolant ODE: both must give the same image."""
    from diffusers import DDIMScheduler

    teacher = teachers.DDPMTeacher.from_pretrained(ddpm_dir)
    ddim = DDIMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler", clip_sample=False)
    ddim.set_timesteps(10)
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = z.clone()
    with torch.no_grad():
        for k in ddim.timesteps:
            eps = teacher.unet(x, k.expand(3)).sample
            x = ddim.step(eps, k, x, eta=0.0).prev_sample
    abar = ddim.alphas_cumprod[ddim.timesteps].double()
    ts = paths.sigma_to_t(paths.alpha_bar_to_sigma(abar))
    alpha_final = ddim.final_alpha_cumprod.double()
    t_end = paths.sigma_to_t(paths.alpha_bar_to_sigma(alpha_final)) if alpha_final < 1 else 0.0
    ts = torch.cat([ts, torch.tensor([float(t_end)], dtype=torch.float64)]).float()
    x_flow = (1 - ts[0]) * z / torch.sqrt(abar[0]).float()
    out = samplers.euler(teacher.velocity, x_flow, ts)
    # bring our result back to the VP scale of DDIM's last state
    scale = torch.sqrt(alpha_final).float() / (1 - ts[-1])
    assert out.nfe == 10
    assert torch.allclose(out.x * scale, x, atol=2e-4), (out.x * scale - x).abs().max()


def test_get_teacher_trains_once_then_loads(tmp_path):
    s = profiles.resolve("foundations", "ci", overrides={"image_steps": 20})
    t1, info1 = teachers.get_teacher(s, root=tmp_path, progress=False)
    t2, info2 = teachers.get_teacher(s, root=tmp_path, progress=False)
    assert info1["trained_now"] and not info2["trained_now"]
    x, tt, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    with torch.no_grad():
        assert torch.equal(t1.velocity(x, tt, y), t2.velocity(x, tt, y))
    out = t2.sample(4, steps=2, y=y)
    assert out.x.shape == (4, 1, 8, 8) and out.nfe == 2
    assert info2["digest"] == teachers.weights_digest(t2.net) == teachers.cached_digest(s, tmp_path)
    # the key names the data set, not its pictures: other images under the same name and size
    # (another copy unpacked to the same place) train the teacher again instead of loading it
    from osdlib import data

    digits = data.load("digits")
    other = data.ImageData("digits", digits.images.flip(-1), digits.labels, digits.class_names)
    t3, info3 = teachers.get_teacher(s, other, root=tmp_path, progress=False)
    assert info3["trained_now"] and info3["data"] == other.fingerprint() != info2["data"]
    assert teachers.cached_digest(s, tmp_path) == teachers.weights_digest(t3.net) != info2["digest"]


def test_teacher_key_names_the_device_only_under_a_time_cap():
    """A teacher trained for 90 s on a CPU is not the one a GPU trains in 90 s: a run that
    falls back to the CPU must not fill the cache a GPU run then loads from."""
    gpu = profiles.resolve("foundations", "gpu")
    keys = {d: teachers._key(teachers.teacher_spec({**gpu, "device": d})) for d in ("cpu", "cuda")}
    assert gpu["image_seconds"] is not None and keys["cpu"] != keys["cuda"]
    assert teachers._key(teachers.teacher_spec({**gpu, "device": "cuda:1"})) == keys["cuda"]
    book = profiles.resolve("foundations", "book")
    spec = teachers.teacher_spec(book)  # no cap: the same teacher wherever it trains
    assert "device" not in spec and spec == teachers.teacher_spec({**book, "device": "cuda"})


def test_flow_teacher_conversions_agree():
    net = nets.build("mlp-2d", (2,))
    t = teachers.FlowTeacher(net, (2,))
    x, tt = torch.randn(6, 2), torch.rand(6) * 0.8 + 0.1
    with torch.no_grad():
        v = t.velocity(x, tt)
        sigma = paths.t_to_sigma(tt)
        d = t.denoise(x / (1 - tt[:, None]), sigma)
    assert torch.allclose(d, paths.velocity_to_x0(v, x, tt), atol=1e-5)
    assert torch.allclose(t.score(x, tt), paths.velocity_to_score(v, x, tt))


class _EDMLike(torch.nn.Module):
    """An EDM-style denoiser net(x, sigma, class_labels) with the attributes load_edm reads."""

    img_channels, img_resolution, label_dim = 1, 2, 0
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, sigma, class_labels=None):
        return self.scale * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_denoiser_teacher_matches_the_exact_teacher():
    from osdlib.teachers import DenoiserTeacher, GaussianMixtureTeacher

    exact = GaussianMixtureTeacher.eight_gaussians()
    wrapped = DenoiserTeacher(lambda_module(exact.denoise), (2,))
    x = torch.randn(16, 2) * 3
    t = torch.rand(16) * 0.9 + 0.05
    torch.testing.assert_close(wrapped.velocity(x, t), exact.velocity(x, t), rtol=1e-4, atol=1e-4)


def lambda_module(fn):
    class M(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return fn(x, sigma)

    return M()


def test_load_edm(tmp_path):
    import pickle

    from osdlib.teachers import load_edm

    path = tmp_path / "edm.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": _EDMLike()}, f)
    teacher = load_edm(path)
    assert teacher.shape == (1, 2, 2) and teacher.num_classes is None
    assert abs(teacher.t_max - 80 / 81) < 1e-6
    x = torch.randn(3, 1, 2, 2)
    x0 = teacher.x0(x, torch.full((3,), 0.5))  # sigma = 1: D = 0.5 x_sigma / 2, x_sigma = 2 x
    torch.testing.assert_close(x0, 0.5 * x)
    bad = tmp_path / "needs_code.pkl"
    bad.write_bytes(b"cno_such_edm_module\nThing\n.")
    with pytest.raises(ModuleNotFoundError, match="EDM code"):
        load_edm(bad)


def test_ddpm_teacher_drives_score_distillation(ddpm_dir):
    """The diffusers DDPM path of chapter 03: the teacher as real score, generator and fake."""
    import copy

    from osdlib.methods import score_distillation as sd

    real = teachers.DDPMTeacher.from_pretrained(ddpm_dir)
    G = sd.Generator(copy.deepcopy(real), times=(real.t_max,))
    model = sd.Distiller(G, copy.deepcopy(real), real.shape)
    before = [p.detach().clone() for p in model.generator.parameters()]
    run = sd.distill(
        sd.Recipe(weighting="vsd"),
        real,
        model,
        lambda g: torch.randn(4, *real.shape, generator=g),
        2,
        progress=False,
    )
    after = list(run.model.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert G.sample(torch.randn(2, *real.shape)).shape == (2, *real.shape)
