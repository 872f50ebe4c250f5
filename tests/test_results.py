import json
from pathlib import Path

from osdlib import __version__, profiles, results

ROOT = Path(__file__).resolve().parents[1]


def test_write_and_read_record(tmp_path):
    s = profiles.resolve("foundations", "ci")
    rows = [results.row("teacher", "proxy-FD", 1.5, nfe=4, dataset="digits")]
    p = results.write_record("foundations", s, {"x": 1.0}, rows, dataset="digits", root=tmp_path)
    assert p == tmp_path / "foundations" / "ci-cpu.json"
    rec = json.loads(p.read_text())
    for key in ("profile", "device", "commit", "metrics", "settings", "seed", "osdlib_version"):
        assert key in rec
    assert rec["osdlib_version"] == __version__
    table = results.markdown_table(tmp_path, link_prefix="results/")
    assert "(results/foundations/ci-cpu.json)" in table and "| 1.5 |" in table
    assert "paper: Ho et al. 2020 (DDPM)" in table  # the papers' numbers sit next to ours


def test_papers_file_cites_known_references():
    bib = (ROOT / "book" / "references.bib").read_text()
    for p in results.read_papers():
        assert {"chapter", "source", "cite", "model", "dataset", "metric", "value"} <= set(p)
        assert "{" + p["cite"] + "," in bib, f"{p['cite']} missing from references.bib"


def test_every_committed_record_is_complete():
    for p in sorted((ROOT / "results").glob("*/*.json")):
        rec = json.loads(p.read_text())
        if p.parent.name == "benchmarks":  # measurements of their own kind, not chapter runs
            assert "wall_s" in rec and ("nvidia" in p.stem or "cpu" in p.stem), p
            continue
        assert {"chapter", "profile", "device", "commit", "metrics", "rows", "wall_s"} <= set(
            rec
        ), p
        assert p.name == f"{rec['profile']}-{rec['device']}.json"


def test_generated_tables_are_up_to_date():
    """README and book/results.md must show exactly what the records say (never typed by hand)."""
    for name, prefix in (("README.md", "results/"), ("book/results.md", None)):
        text = (ROOT / name).read_text()
        block = text.split(results.START, 1)[1].split(results.END, 1)[0]
        expected = "\n" + results.markdown_table(ROOT / "results", prefix)
        assert block == expected, f"{name} is stale: run `make results`"
