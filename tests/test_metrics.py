import numpy as np
import pytest
import scipy.linalg
import torch

from osdlib import metrics


def numpy_frechet(a, b):
    """Reference: the textbook formula with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_identical_is_zero_and_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g)
    b = torch.randn(400, 16, generator=g) * 1.3 + 0.2
    assert abs(metrics.frechet_distance(a, a)) < 1e-6
    ref = numpy_frechet(a.double().numpy(), b.double().numpy())
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert ref > 0.5


def test_sliced_wasserstein_zero_for_identical_and_grows_with_shift():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert metrics.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-9)
    d = [metrics.sliced_wasserstein(x, x + torch.tensor([s, 0.0])) for s in (0.5, 1.0, 2.0)]
    assert d[0] < d[1] < d[2]
    # a shift by s along e1 gives sqrt(E cos^2) * s = s / sqrt(2) in 2-D
    assert d[2] == pytest.approx(2.0 / np.sqrt(2), rel=0.05)
    # different sample sizes are compared through quantiles
    assert metrics.sliced_wasserstein(x, x[:1000]) < 0.1


def test_energy_distance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    assert abs(metrics.energy_distance(x, y)) < 0.02
    assert metrics.energy_distance(x, y + 1.0) > 0.5


def test_modes_hit():
    from osdlib.data import eight_gaussian_centers, eight_gaussians

    c = eight_gaussian_centers()
    assert metrics.modes_hit(eight_gaussians(4000, torch.Generator().manual_seed(0)), c) == 8
    collapsed = c[:2].repeat(500, 1) + 0.1 * torch.randn(1000, 2)
    assert metrics.modes_hit(collapsed, c) == 2


class _Perfect(torch.nn.Module):
    """Classifies 1x4x4 images by the index of their brightest pixel (for testing)."""

    def features(self, x):
        return x.reshape(len(x), -1)

    def forward(self, x):
        return self.features(x)


def test_accuracy_and_proxy_fd():
    y = torch.randint(0, 16, (300,), generator=torch.Generator().manual_seed(0))
    x = -torch.ones(300, 1, 4, 4)
    x.view(300, -1)[torch.arange(300), y] = 1.0
    clf = _Perfect()
    assert metrics.accuracy(clf, x, y) == 1.0
    assert metrics.accuracy(clf, x, (y + 1) % 16) == 0.0
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert abs(metrics.proxy_fd(clf, x, x)) < 1e-6
    assert metrics.proxy_fd(clf, x, x.flip(0) * 0.5) > 0.1


def test_proxy_fd_keeps_reference_features_only_while_they_are_valid():
    class Linear(torch.nn.Linear):
        def features(self, x):  # proxy_features reads .features
            return self(x.flatten(1))

    torch.manual_seed(0)
    clf = Linear(16, 8)
    ref = torch.randn(200, 1, 4, 4)
    x = torch.randn(200, 1, 4, 4) + 0.3
    first = metrics.proxy_fd(clf, x, ref)
    assert metrics.proxy_fd(clf, x, ref) == first  # the same reference, cached
    with torch.no_grad():  # new weights: the cached reference features must not be reused
        clf.weight.mul_(2.0)
    fresh = metrics.proxy_fd(clf, x, ref)
    expected = metrics.frechet_distance(
        metrics.proxy_features(clf, x), metrics.proxy_features(clf, ref)
    )
    assert fresh == pytest.approx(expected) and fresh != pytest.approx(first)


def test_fid_label():
    assert metrics.fid_label(5000) == "FID (5k)" and metrics.fid_label(50_000) == "FID (50k)"
    assert metrics.fid_label(200) == "FID (200)"


def test_fid_pipeline_with_a_registered_feature_extractor(tmp_path, monkeypatch):
    """The real torch-fidelity path (uint8 rounding, datasets, statistics) with a tiny
    extractor registered for the test, since Inception weights cannot be downloaded here."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class MeanColour(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("stats",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "stats"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            assert x.dtype == torch.uint8
            x = x.float()
            return (torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::4, ::4].flatten(1)], 1),)

    try:
        torch_fidelity.register_feature_extractor("osd-test-stats", MeanColour)
    except Exception:
        pass  # already registered in this process
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))  # reference statistics land here
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    b = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    kw = dict(feature_extractor="osd-test-stats", batch_size=32)
    assert metrics.fid(a, a, **kw) == pytest.approx(0.0, abs=1e-3)
    same = metrics.fid(a, b, **kw)
    shifted = metrics.fid((a * 0.5 + 0.4), b, **kw)
    assert 0 < same < shifted
    # an ImageData reference's statistics are cached under its name, size, source and
    # content: another copy unpacked to the same place (same name, size and source) is not
    # mistaken for the first
    from osdlib.data import ImageData

    u8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    first = ImageData("cifar10", u8(b), torch.zeros(64), source="folder:/data/train")
    other = ImageData("cifar10", u8(a), torch.zeros(64), source="folder:/data/train")
    assert first.fingerprint() != other.fingerprint()
    assert first.fingerprint() == ImageData("x", u8(b).clone(), torch.zeros(64)).fingerprint()
    assert metrics.fid(a, first, **kw) == pytest.approx(same, rel=1e-4)
    assert metrics.fid(a, other, **kw) == pytest.approx(0.0, abs=1e-3)


def test_fid_without_weights_says_what_to_do(tmp_path):
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="OSD_INCEPTION_WEIGHTS"):
        metrics.fid(x, x, weights_path=str(tmp_path / "missing.pth"))


def test_within_class_std():
    y = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[-1.0], [1.0], [0.5], [0.5]]).reshape(4, 1, 1, 1)
    # class 0: values -1 and 1 (std sqrt(2)); class 1: identical values (std 0)
    assert metrics.within_class_std(x, y) == pytest.approx(2**0.5 / 2)
    assert metrics.within_class_std(torch.full((4, 1, 1, 1), 255, dtype=torch.uint8), y) == 0.0


def test_over_seeds_means_and_spreads():
    rows = [
        {"model": "a", "seed": s, "nfe": 1, "swd": v, "note": "x"}
        for s, v in enumerate((1.0, 2.0, 3.0))
    ] + [{"model": "b", "seed": 0, "nfe": 4, "swd": 5.0, "note": "y"}]
    a, b = metrics.over_seeds(rows)
    assert a["model"] == "a" and a["seeds"] == 3 and a["nfe"] == 1 and "nfe_std" not in a
    assert a["swd"] == pytest.approx(2.0) and a["swd_std"] == pytest.approx(1.0)
    assert a["note"] == "x" and "seed" not in a
    assert b["seeds"] == 1 and b["swd"] == 5.0 and "swd_std" not in b


def test_image_eval_rows_and_grid():
    from osdlib import data, nets

    images = data.digits()
    torch.manual_seed(0)
    clf = nets.SmallClassifier(1, 10, width=8).eval()
    ev = metrics.ImageEval(images, clf, n=40, seed=1, per_class=2)
    assert torch.equal(ev.labels[:12], torch.arange(12) % 10)
    again = metrics.ImageEval(images, clf, n=40, seed=1)
    assert torch.equal(ev.z, again.z)  # every model of a chapter sees the same noises
    x = ev.sample(lambda z, y: z.clamp(-1, 1), chunk=16)
    assert x.shape == (40, 1, 8, 8)
    row = ev(x, model="noise")
    assert row["model"] == "noise" and set(row) >= {"accuracy", "proxy_fd", "within_class_std"}
    real = images.float_images()[:40]
    assert ev(real)["proxy_fd"] < row["proxy_fd"]
    grid = ev.grid(x)
    assert len(grid) == 20 and (ev.labels[ev.show] == torch.arange(10).repeat_interleave(2)).all()


def test_image_eval_leaves_fid_out_close_to_the_chapters_deadline(monkeypatch, tmp_path):
    """The chapter chain sets $OSD_DEADLINE; an evaluation within FID_RESERVE_S of it skips
    FID (and says so in the row) so that the chapter still writes its record."""
    import time

    from osdlib import data, nets

    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))  # no FID timed yet

    images = data.digits()
    clf = nets.SmallClassifier(1, 10, width=8).eval()
    ev = metrics.ImageEval(images, clf, n=20, seed=1, fid=True)
    x = images.float_images()[:20]
    calls = []
    monkeypatch.setattr(metrics, "fid", lambda *a, **k: calls.append(1) or 12.5)
    monkeypatch.delenv("OSD_DEADLINE", raising=False)
    assert metrics.time_left() is None and ev(x, model="m")["fid"] == 12.5  # no deadline
    monkeypatch.setenv("OSD_DEADLINE", str(time.time() + 10 * metrics.FID_RESERVE_S))
    assert ev(x, model="m")["fid"] == 12.5 and len(calls) == 2  # far from it
    monkeypatch.setenv("OSD_DEADLINE", str(time.time() + metrics.FID_RESERVE_S / 2))
    row = ev(x, model="m")
    assert "fid" not in row and "deadline" in row["fid_skipped"] and len(calls) == 2
    assert not metrics.fid_in_time()  # what chapters 00 and 06 ask before their own FIDs
    assert row["proxy_fd"] > 0  # the rest of the row is still measured


def test_classifier_is_the_same_ruler_for_every_seed(tmp_path):
    from osdlib import data, profiles

    images = data.load("digits")
    s0 = profiles.resolve("foundations", "ci", seed=0, overrides={"classifier_steps": 5})
    s1 = profiles.resolve("foundations", "ci", seed=1, overrides={"classifier_steps": 5})
    _, info0 = metrics.get_classifier(s0, images, root=tmp_path, progress=False)
    _, info1 = metrics.get_classifier(s1, images, root=tmp_path, progress=False)
    assert info0["trained_now"] and not info1["trained_now"]
    # other images under the same name and size: trained again, not loaded
    other = data.ImageData("digits", images.images.flip(-1), images.labels, images.class_names)
    _, info2 = metrics.get_classifier(s0, other, root=tmp_path, progress=False)
    assert info2["trained_now"] and info2["data"] == other.fingerprint() != info0["data"]


def test_pooled_equals_the_statistics_of_all_values():
    values = [0.3, 0.5, 0.4, 1.2, 0.9, 0.7, 0.1]
    parts = [values[:3], values[3:4], values[4:]]  # one part a single run without a spread
    groups = [(len(p), *metrics.mean_std(p)) for p in parts]
    groups[1] = (1, groups[1][1], None)
    n, mean, std = metrics.pooled(groups)
    assert n == 7
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert metrics.pooled([(1, 2.0, None)]) == (1, 2.0, None)


def test_the_fid_reserve_follows_the_last_fid_timed_on_the_device(monkeypatch, tmp_path, capsys):
    """fid() notes how long it took; a chapter close to its deadline then needs 1.5 times
    that (scaled up to more samples, never down) plus FID_TAIL_S, not FID_RESERVE_S."""
    import time

    from osdlib import data, nets

    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    assert metrics.fid_seconds(5000, "cpu") is None
    assert metrics.fid_reserve_s(5000, "cpu") == metrics.FID_RESERVE_S
    metrics.note_fid_time(4.0, 5000, "cpu")
    assert metrics.fid_seconds(10000, "cpu") == pytest.approx(8.0)
    assert metrics.fid_seconds(20, "cpu") == pytest.approx(4.0)  # fixed costs stay
    assert metrics.fid_reserve_s(5000, "cpu") == pytest.approx(metrics.FID_TAIL_S + 6.0)
    images = data.digits()
    ev = metrics.ImageEval(images, nets.SmallClassifier(1, 10, width=8).eval(), n=20, fid=True)
    monkeypatch.setattr(metrics, "fid", lambda *a, **k: 12.5)
    monkeypatch.setenv("OSD_DEADLINE", str(time.time() + 13))  # more than the 11 s needed
    assert ev(images.float_images()[:20], model="m")["fid"] == 12.5
    monkeypatch.setenv("OSD_DEADLINE", str(time.time() + 9))
    row = ev(images.float_images()[:20], model="m", nfe=4)
    assert "fid" not in row and "11 s needed" in row["fid_skipped"]
    assert "FID of m at NFE 4 skipped" in capsys.readouterr().out
    (tmp_path / "fid" / "timing.json").write_text("[]")  # not ours: the default again
    assert metrics.fid_reserve_s(5000, "cpu") == metrics.FID_RESERVE_S


def test_fid_notes_the_time_of_its_samples_only(monkeypatch, tmp_path):
    """Timed: an Inception FID whose reference statistics were cached (the first call, which
    computes them, is not); not timed: another feature extractor. A cache that cannot be
    written does not cost the FID."""
    import json
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    def calculate_metrics(**k):  # writes the reference statistics as torch-fidelity does
        time.sleep(0.05)
        root = Path(k["cache_root"])
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{k['input2_cache_name']}-inception-v3-compat-stat-fid-2048.pt").touch()
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    fake = SimpleNamespace(calculate_metrics=calculate_metrics)
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    monkeypatch.setattr(metrics, "inception_weights", lambda path: None)
    x = torch.zeros(7, 3, 8, 8, dtype=torch.uint8)
    timing = tmp_path / "fid" / "timing.json"
    assert metrics.fid(x, x, cache_name="ref") == 1.0 and not timing.exists()
    assert metrics.fid(x, x, cache_name="ref") == 1.0
    timed = json.loads(timing.read_text())["cpu"]
    assert timed["samples"] == 7 and timed["seconds"] >= 0.05
    timing.unlink()
    metrics.fid(x, x, cache_name="ref", feature_extractor="clip-vit-b-32")
    assert not timing.exists()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("OSD_CACHE_DIR", str(blocked))
    metrics.note_fid_time(1.0, 7, "cpu")  # nothing written, nothing raised
