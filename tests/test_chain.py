"""The gpu-profile chain (scripts/run_chapters.py) end to end on a tiny class-folder data set.

The same script runs the book on a GPU (`make gpu-book`, scripts/offline_run.sh); here every
chapter runs at the gpu profile's settings with its step counts and sample sizes shrunk
(``--dry-run``), on 200 random 32x32 images in CIFAR-10's folder layout (found where the
chapters look, ``$OSD_DATA_DIR/cifar10/train``), on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_chapters.py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fixture(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i:04d}.jpg", quality=90)
    return root


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_chapters", SCRIPT)
    run_chapters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_chapters)
    return run_chapters


def _run(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_bad_input_says_what_to_do(tmp_path):
    out = _run("--profile", "gpu", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert out.returncode == 2 and "does not exist" in out.stderr
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "flat" / "0.jpg")
    out = _run("--profile", "gpu", "--data-root", str(tmp_path / "flat"), "--out", str(tmp_path))
    assert out.returncode == 2 and "class sub-folders" in out.stderr
    out = _run("--chapters", "99", "--profile", "ci", "--out", str(tmp_path))
    assert out.returncode != 0 and "unknown chapter" in out.stderr
    assert not list(tmp_path.glob("*.ipynb"))  # nothing was half-written


def test_offline_run_unpacks_the_exported_zips_and_refuses_a_wrong_layout(tmp_path):
    """scripts/offline_run.sh on a zip from `python -m osdlib.data --export-cifar10`: the
    images arrive unchanged where the chapters look; a zip of another layout stops it with
    one message before anything is unpacked. (The chain itself stops at the unknown chapter.)"""
    import zipfile

    import torch

    from osdlib import data

    kit, good, bad = tmp_path / "kit", tmp_path / "good", tmp_path / "bad"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "torch-0-py3-none-any.whl").write_bytes(b"")  # installed already
    (kit / "inception-fp16.pth").write_bytes(b"")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    d = data.ImageData("cifar10", images, torch.tensor([0, 1, 2, 0, 1, 2]), CLASSES[:3])
    data.write_class_zip(d, good / "train.zip", progress=False)
    bad.mkdir()
    with zipfile.ZipFile(bad / "train.zip", "w") as zf:
        zf.writestr("images/0.png", b"")

    def offline_run(folder, work):
        env = {**os.environ, "PYTHON": sys.executable, "OSD_WORK_DIR": str(work)}
        script = ROOT / "scripts" / "offline_run.sh"
        args = [str(kit), str(folder), str(tmp_path / "out"), "--chapters", "99"]
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env)

    out = offline_run(bad, tmp_path / "work-bad")
    assert out.returncode == 2 and "wrong layout" in out.stderr and "train/<class>" in out.stderr
    assert not (tmp_path / "work-bad" / "data" / "cifar10" / "train").exists()
    out = offline_run(good, tmp_path / "work")
    assert "unknown chapter" in out.stderr, out.stderr
    train = tmp_path / "work" / "data" / "cifar10" / "train"
    back = data.image_folder(train, progress=False, cache=False)
    assert back.class_names == CLASSES[:3] and torch.equal(back.images, images[[0, 3, 1, 4, 2, 5]])


def test_offline_run_hands_the_chapters_absolute_paths(tmp_path):
    """Called from elsewhere with relative paths, the kernels (which run in the checkout) must
    still find the weights, data, wheels, cache and output: every path they get is absolute."""
    import torch

    from osdlib import data

    kit, zips = tmp_path / "kit", tmp_path / "zips"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "torch-0-py3-none-any.whl").write_bytes(b"")  # installed already
    (kit / "inception-fp16.pth").write_bytes(b"")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    d = data.ImageData("cifar10", images, torch.tensor([0, 1, 2]), CLASSES[:3])
    data.write_class_zip(d, zips / "train.zip", progress=False)
    # a Python that shows what run_chapters.py would be given, and runs everything else
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'case "$1" in *run_chapters.py) shift; echo "ARGS $*"; '
        "for v in OSD_DATA_DIR OSD_INCEPTION_WEIGHTS OSD_CACHE_DIR PYTHONPATH; "
        'do echo "$v=${!v}"; done; exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OSD_WORK_DIR": "work", "OSD_CACHE_DIR": "cache"}
    env.pop("PYTHONPATH", None)
    script = ROOT / "scripts" / "offline_run.sh"
    out = subprocess.run(
        ["bash", str(script), "kit", "zips", "out"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    paths = [*lines["PYTHONPATH"].split(":"), *(lines[v] for v in lines if v != "PYTHONPATH")]
    (args,) = [line for line in out.stdout.splitlines() if line.startswith("ARGS ")]
    paths.append(args.split("--out ")[1].split()[0])
    assert all(Path(p).is_absolute() for p in paths), paths
    assert all(Path(p).exists() for p in paths[-4:]), paths  # data, weights, cache, out
    assert lines["OSD_CACHE_DIR"] == str(tmp_path / "cache")


def test_a_chapter_that_cannot_finish_before_the_deadline_is_not_started(tmp_path):
    out = _run("--profile", "ci", "--chapters", "00", "--deadline", "5", "--out", str(tmp_path))
    (chapter,) = json.loads((tmp_path / "chapters.json").read_text())["metrics"]["chapters"]
    assert out.returncode == 1 and chapter["status"] == "skipped"
    assert "budget 240 s" in chapter["message"] and not list(tmp_path.glob("*.ipynb"))
    # The chain split over two calls into one OUT: an earlier call's chapters stay in the
    # summary, and a chapter this call skipped keeps its earlier result.
    summary = json.loads((tmp_path / "chapters.json").read_text())
    summary["metrics"]["chapters"] = [
        {"chapter": "00_foundations", "status": "ok", "wall_s": 200.0},
        {"chapter": "01_rectified_flow", "status": "ok", "wall_s": 80.0},
    ]
    (tmp_path / "chapters.json").write_text(json.dumps(summary))
    out = _run("--profile", "ci", "--chapters", "00", "--deadline", "5", "--out", str(tmp_path))
    chapters = json.loads((tmp_path / "chapters.json").read_text())["metrics"]["chapters"]
    assert [(c["chapter"], c["status"]) for c in chapters] == [
        ("00_foundations", "ok"),
        ("01_rectified_flow", "ok"),
    ]


def _sleeper(folder: Path) -> tuple[Path, Path]:
    """A notebook whose kernel starts a worker, writes both process ids to a file and sleeps."""
    import nbformat

    pid_file = folder / "kernel.pid"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, pathlib, subprocess, sys\n"
            "# a worker in a session of its own, as a data loader or compile worker may be\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
            "                     start_new_session=True)\n"
            f"pathlib.Path({str(pid_file)!r}).write_text(f'{{os.getpid()}} {{w.pid}}')"
        ),
        nbformat.v4.new_code_cell("import time\ntime.sleep(60)"),
    ]
    path = folder / "99_sleeper.ipynb"
    nbformat.write(nb, path)
    return path, pid_file


def _gone(pid: int, wait: float = 5.0) -> bool:
    import time

    psutil = pytest.importorskip("psutil")

    end = time.time() + wait
    while time.time() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_a_chapter_over_budget_is_stopped_with_its_kernel(tmp_path):
    notebook, pid_file = _sleeper(tmp_path)
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OSD_PROGRESS="0")
    result = _script().run_chapter(notebook, tmp_path / "out", env, 15.0, {}, False)
    assert result["status"] == "over budget" and result["wall_s"] < 45
    # the kernel runs in a session of its own: stopping papermill alone would leave it running
    # (a recent ipykernel ends itself soon after its parent, an older one does not, and the
    # kernel's own workers never do)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and all(_gone(p, wait=1.0) for p in pids)


def test_stop_reaches_a_process_in_a_session_of_its_own(tmp_path):
    """As jupyter_client starts a kernel: papermill's process group does not hold it."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time, pathlib; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True); "
        f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    end = time.time() + 20
    while not pid_file.exists() and time.time() < end:
        time.sleep(0.1)
    _script().stop(proc, grace=5.0)
    assert proc.returncode == -signal.SIGTERM and _gone(int(pid_file.read_text()), wait=1.0)


def test_a_stopped_runner_stops_its_chapter(tmp_path):
    import signal
    import time

    notebook, pid_file = _sleeper(tmp_path)
    (tmp_path / "out").mkdir()
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import run_chapters as rc; "
        "signal.signal(signal.SIGTERM, rc._terminated); from pathlib import Path; "
        "rc.run_chapter(Path(sys.argv[2]), Path(sys.argv[3]), dict(os.environ), 300.0, {}, False)"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", code, str(SCRIPT.parent), str(notebook), str(tmp_path / "out")]
    )
    end = time.time() + 60
    while time.time() < end and len(pid_file.read_text().split() if pid_file.exists() else []) < 2:
        time.sleep(0.2)
    assert pid_file.exists(), "the kernel did not start"
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=40) == 128 + signal.SIGTERM
    assert all(_gone(int(p)) for p in pid_file.read_text().split())


def test_preflight_asks_for_fid_weights_only_when_fid_runs(tmp_path, monkeypatch):
    from osdlib import data as data_mod
    from osdlib import metrics

    run_chapters = _script()
    data = _fixture(tmp_path / "train", per_class=1)
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path / "cache"))  # no converted weights here
    monkeypatch.delenv("OSD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(data_mod, "online", lambda *a, **k: False)
    monkeypatch.setattr(metrics, "fid_helper_installed", lambda: False)
    (problem,) = run_chapters.preflight("gpu", str(data), fid=True)
    assert "make fid-weights" in problem
    assert run_chapters.preflight("gpu", str(data), fid=False) == []
    monkeypatch.setattr(metrics, "fid_helper_installed", lambda: True)  # converted on first use
    assert run_chapters.preflight("gpu", str(data), fid=True) == []
    monkeypatch.setenv("OSD_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    (problem,) = run_chapters.preflight("gpu", str(data), fid=True)
    assert "missing.pth" in problem


def test_preflight_asks_for_lpips_weights_only_where_a_chapter_trains_with_lpips(
    tmp_path, monkeypatch, capsys
):
    from osdlib import data as data_mod
    from osdlib import losses

    run_chapters = _script()
    data = _fixture(tmp_path / "train", per_class=1)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setattr(data_mod, "online", lambda *a, **k: False)
    files = losses.lpips_files()
    assert [f.name for f in files] == ["weights-vgg16-lpips.pth", "vgg16-397923af.pth"]
    assert all(f.parent == tmp_path / "torch" / "hub" / "checkpoints" for f in files)
    (problem,) = run_chapters.preflight("paper", str(data), fid=False, lpips=True)
    assert all(f.name in problem for f in files) and '"distance": "pseudo_huber"' in problem
    assert run_chapters.preflight("paper", str(data), fid=False, lpips=False) == []
    # the whole run stops before any chapter: chapter 01 at paper distils with LPIPS
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("OSD_INCEPTION_WEIGHTS", str(weights))
    argv = ["--profile", "paper", "--chapters", "01", "--data-root", str(data)]
    assert run_chapters.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "LPIPS distance needs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    files[0].parent.mkdir(parents=True)
    for f in files:  # copied from a machine with internet
        f.write_bytes(b"")
    assert run_chapters.preflight("paper", str(data), fid=False, lpips=True) == []
    monkeypatch.setattr(data_mod, "online", lambda *a, **k: True)  # or downloadable
    files[0].unlink()
    assert run_chapters.preflight("paper", str(data), fid=False, lpips=True) == []


@pytest.mark.parametrize("profile", ["gpu", "paper"])
def test_a_dry_run_is_small_at_every_profile(profile):
    # the dry run must stay minutes on a CPU whatever the profile's sizes: the paper profile's
    # step counts are 100x the gpu profile's, including those of the generators that chapter
    # 05 trains when they are not in the cache
    from osdlib import generators, profiles

    run_chapters = _script()
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        small = run_chapters.shrink(profiles.resolve(nb.stem[3:], profile))
        settings = profiles.resolve(nb.stem[3:], profile, overrides=small)
        sizes = {k: v for k, v in settings.items() if k.endswith("steps") and isinstance(v, int)}
        assert max(sizes.values(), default=0) <= 3, (nb.stem, sizes)
        for kind in settings.get("generators", []):
            r = generators.recipe(
                kind, profile, settings.generator_scale, settings.generator_overrides
            )
            assert max(v for k, v in r.items() if k.endswith("steps")) <= 3, (kind, r)
            assert r.get("pairs", 0) <= 64


def test_chapter_05_in_a_chain_asks_for_the_generators_its_source_chapters_trained():
    from osdlib import generators, profiles

    rc = _script()
    found, retrain = rc.source_generator_overrides(
        "gpu", {"04": {"steps": 7}, "02": {"ect_steps": 9}}, False
    )
    assert found == {"ect_steps": 9, "steps": 7} and retrain == []
    ran = profiles.resolve("dmd2", "gpu", overrides={"steps": 7})
    assert generators.recipe("dmd2", "gpu", 1.0, found) == generators.recipe_of("dmd2", ran)
    assert rc.source_generator_overrides("gpu", {}, False) == ({}, [])
    assert rc.source_generator_overrides("gpu", {"all": {"batch": 16}}, False) == (
        {"batch": 16},
        [],
    )
    # a setting the sources share, changed for one of them: the others cannot be found
    assert rc.source_generator_overrides("gpu", {"01": {"batch": 16}}, False)[1] == ["ect", "dmd2"]
    # how 2-RF's pairs are sampled and stored is part of its recipe: 05 follows it, and the
    # others do not depend on it
    for given in ({"all": {"sample_bf16": False}}, {"01": {"fp16_pairs": False}}):
        found, retrain = rc.source_generator_overrides("gpu", given, False)
        assert retrain == [] and set(found) == set(next(iter(given.values())))
        assert generators.recipe("2-rf-distilled", "gpu", 1.0, found) == generators.recipe_of(
            "2-rf-distilled", profiles.resolve("rectified_flow", "gpu", overrides=found)
        )
    # under a time cap the recipe names the device: a chain moved to another device as a
    # whole finds the generators, one source chapter on another device does not
    found, retrain = rc.source_generator_overrides("gpu", {"all": {"device": "cpu"}}, False)
    assert "device" not in found and retrain == []
    retrain = rc.source_generator_overrides("gpu", {"02": {"device": "meta"}}, False)[1]
    assert retrain == ["ect"]
    dry, retrain = rc.source_generator_overrides("paper", {}, True)
    assert retrain == [] and max(v for k, v in dry.items() if k.endswith("steps")) <= 3


def test_gpu_chain_dry_run_on_a_class_folder_fixture(tmp_path):
    import os

    _fixture(tmp_path / "data" / "cifar10" / "train", per_class=20)  # 200 images
    env = dict(
        os.environ,
        OSD_CACHE_DIR=str(tmp_path / "cache"),
        OSD_DATA_DIR=str(tmp_path / "data"),
    )
    out_dir = tmp_path / "out"
    overrides = {"all": {"fid": False}}  # FID has its own tests (tests/test_fid.py)
    proc = _run(
        "--profile",
        "gpu",
        "--dry-run",
        "--dataset-label",
        "random fixture",
        "--overrides",
        json.dumps(overrides),
        "--budget-scale",
        "5",
        "--out",
        str(out_dir),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out_dir / "chapters.json").read_text())
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [c["chapter"] + ".ipynb" for c in summary["metrics"]["chapters"]] == notebooks
    assert all(c["status"] == "ok" for c in summary["metrics"]["chapters"])
    for name in notebooks:  # executed, with the chain's records and figures
        nb = json.loads((out_dir / name).read_text())
        assert nb["metadata"]["papermill"]["exception"] is None
        assert nb["metadata"]["papermill"]["input_path"] == f"notebooks/{name}"  # no machine paths
        assert str(tmp_path) not in json.dumps(nb)
    # chapter 05 found the one-step generators that chapters 01, 02 and 04 stored
    reno = json.dumps(json.loads((out_dir / "05_reno.ipynb").read_text()))
    assert all(f"made by chapter {c}, from the cache" in reno for c in ("01", "02", "04"))
    records = sorted((out_dir / "results").glob("*/gpu-cpu.json"))
    assert len(records) == len(notebooks)
    rec = json.loads(records[0].read_text())
    assert rec["profile"] == "gpu" and rec["dataset"] == "random fixture"
    assert list((out_dir / "figures").glob("00-*.png"))
