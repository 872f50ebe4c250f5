"""Structure of the chapters: in the TOC, parameterised, committed executed without errors."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# chapters as a GPU run executed them at the gpu profile (pages of the book, not re-run)
GPU_RUNS = sorted((ROOT / "gpu").glob("*.ipynb"))


def _toc_files(node):
    if isinstance(node, dict):
        if "file" in node:
            yield node["file"]
        for v in node.values():
            yield from _toc_files(v)
    elif isinstance(node, list):
        for v in node:
            yield from _toc_files(v)


def test_every_notebook_is_in_the_toc_and_back():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = set(_toc_files(toc)) | {toc["root"]}
    nb_files = {f"notebooks/{p.stem}" for p in NOTEBOOKS}
    nb_files |= {f"gpu/{p.stem}" for p in GPU_RUNS}
    assert nb_files and nb_files <= files
    for f in files:
        assert list(ROOT.glob(f + ".*")), f"TOC entry {f} has no file"


def test_notebooks_are_parameterised_executed_and_clean():
    for p in NOTEBOOKS + GPU_RUNS:
        nb = json.loads(p.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(params) == 1, f"{p.name}: one cell tagged 'parameters'"
        first = [
            ln
            for ln in "".join(params[0]["source"]).splitlines()
            if "=" in ln and not ln.lstrip().startswith(("#", "import"))
        ][0]
        assert first.startswith("profile"), f"{p.name}: the first parameter must be profile"
        assert all(c["execution_count"] is not None for c in code), f"{p.name}: unexecuted cells"
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{p.name}: stored error outputs"
        assert p.stat().st_size < 3_000_000, f"{p.name} is too large"
        injected = [
            c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])
        ]
        assert not injected, (
            f"{p.name} stores papermill's injected parameters, which would override the ci "
            "profile in CI: refresh it with `make reproduce ... OUT=notebooks/...`"
        )


def test_chapters_open_as_a_reader_expects():
    """Title first, the install cell and the settings table collapsed, no progress bars in
    the stored outputs (they are for interactive runs: OSD_PROGRESS=0 in make reproduce)."""
    bar = re.compile(r"\d+/\d+ \[[0-9:]+<[0-9:?]+|it/s\]|s/it\]")
    for p in NOTEBOOKS + GPU_RUNS:
        nb = json.loads(p.read_text())
        first = nb["cells"][0]
        assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# "), (
            f"{p.name}: the chapter's title comes first"
        )
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        install = [c for c in code if 'find_spec("osdlib")' in "".join(c["source"])]
        assert len(install) == 1 and "hide-cell" in install[0]["metadata"].get("tags", []), (
            f"{p.name}: one install cell, tagged hide-cell"
        )
        table = [c for c in code if "profiles.resolve(" in "".join(c["source"])]
        assert "hide-output" in table[0]["metadata"].get("tags", []), (
            f"{p.name}: the settings table is collapsed (hide-output)"
        )
        for c in code:
            for o in c["outputs"]:
                text = "".join(o.get("text", ""))
                assert not bar.search(text), f"{p.name}: a progress bar in a stored output"


def test_gpu_runs_are_the_chapters_at_gpu_with_their_records():
    """Each page of gpu/ is a chapter of notebooks/ executed at the gpu profile: it says
    so at the top, its settings table shows the profile, and its record is committed."""
    from osdlib import results

    assert GPU_RUNS, "no GPU run committed"
    for p in GPU_RUNS:
        assert (ROOT / "notebooks" / p.name).exists(), f"{p.name}: no such chapter"
        nb = json.loads(p.read_text())
        note = "".join(nb["cells"][1]["source"])
        assert nb["cells"][1]["cell_type"] == "markdown" and "`gpu` profile" in note, p.name
        text = "".join(  # printed lines, and the plain text of displayed tables
            "".join(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
            for c in nb["cells"]
            if c["cell_type"] == "code"
            for o in c["outputs"]
        )
        found = re.search(r"device: (nvidia-[\w-]+)", text)
        assert found, f"{p.name}: no GPU named in its outputs"
        device = found.group(1)
        assert re.search(r"\bprofile +gpu\b", text), f"{p.name}: not executed at gpu"
        chapter = results.CHAPTERS[int(p.name[:2])]
        record = ROOT / "results" / chapter / f"gpu-{device}.json"
        assert record.exists(), f"{p.name}: its record {record.name} is not committed"
        assert f"results/{chapter}/gpu-{device}.json" in note, f"{p.name}: note names its record"
