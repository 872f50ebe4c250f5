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
    assert "(Ho et al. 2020, DDPM) |" in table  # the papers' numbers sit next to ours


def test_other_seeds_write_their_own_record(tmp_path):
    rows = [results.row("teacher", "proxy-FD", 1.5, nfe=4, dataset="digits")]
    paths = [
        results.write_record(
            "foundations", profiles.resolve("foundations", "ci", seed=s), {}, rows, root=tmp_path
        )
        for s in (0, 1, 2)
    ]
    assert [p.name for p in paths] == ["ci-cpu.json", "ci-cpu-seed1.json", "ci-cpu-seed2.json"]
    assert [json.loads(p.read_text())["seed"] for p in paths] == [0, 1, 2]


def _record(root, chapter, profile, device, rows, **extra):
    rec = {
        "chapter": chapter,
        "profile": profile,
        "device": device,
        "seed": 0,
        "dataset": "digits (sklearn.datasets.load_digits, 1797 images)",
        "rows": rows,
        "wall_s": 570.77,
        "commit": "4895cce403bece856a9946e58043e51c4142f9c5",
        **extra,
    }
    path = root / chapter / f"{profile}-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def _block(table, chapter):
    """The part of the generated tables that belongs to one chapter."""
    return table.split(f"**{chapter}**\n", 1)[1].split("\n**", 1)[0]


def test_compact_table_has_one_provenance_line_per_run(tmp_path):
    fd = "proxy-FD (classifier features, not FID)"
    digits = "digits (sklearn.datasets.load_digits, 1797 images)"
    _record(
        tmp_path,
        "consistency",
        "book",
        "cpu",
        [
            results.row("ECT", fd, 56.25, nfe=1, dataset=digits),
            results.row("CT (2-D)", "SWD", 0.277, nfe=1, dataset="8gaussians"),
        ],
    )
    _record(
        tmp_path,
        "consistency",
        "gpu",
        "nvidia-h100",
        [
            results.row("ECT", "FID (50k)", 3.9, nfe=1, dataset="CIFAR-10 (JPEG copy)"),
        ],
        wall_s=42.0,
        commit="abcdef0123456789abcdef0123456789abcdef01+dirty",
        dataset="CIFAR-10",
    )
    block = _block(results.markdown_table(tmp_path, link_prefix="results/"), "consistency")
    lines = block.strip().splitlines()
    runs = [ln for ln in lines if ln.startswith("Run: ")]
    assert runs == [
        "Run: `book` profile on `cpu`, seed 0, commit `4895cce`, wall time 9 min 31 s, "
        f"data: {digits}; record "
        "[results/consistency/book-cpu.json](results/consistency/book-cpu.json)",
        "Run: `gpu` profile on `nvidia-h100`, seed 0, commit `abcdef0+dirty`, wall time 42 s, "
        "data: CIFAR-10; record "
        "[results/consistency/gpu-nvidia-h100.json](results/consistency/gpu-nvidia-h100.json)",
    ]  # the smaller profile first, each with its own table
    # The papers' numbers go with the run that measured their metric: only its table has a
    # paper column.
    assert sum(ln == "| model | NFE | metric | ours | paper |" for ln in lines) == 1
    assert sum(ln == "| model | NFE | metric | ours |" for ln in lines) == 1
    # The record's path and the full dataset description are said once, not on every row.
    assert block.count("book-cpu.json") == 2 and block.count(digits) == 1
    assert "| ECT | 1 | proxy-FD (classifier features, not FID) on digits | 56.2 |" in lines
    assert "| CT (2-D) | 1 | SWD on 8gaussians | 0.277 |" in lines
    # Every row of a table has its header's columns.
    book_lines, gpu_lines = (t.splitlines() for t in block.split("gpu-nvidia-h100.json)", 1))
    assert all(ln.count("|") == 5 for ln in book_lines if ln.startswith("|"))
    assert all(ln.count("|") == 6 for ln in gpu_lines if ln.startswith("|"))
    # The papers' FIDs on CIFAR-10 sit in the table of the run that measured FID on CIFAR-10.
    gpu_table = block.split("gpu-nvidia-h100.json)", 1)[1]
    assert "| FID (50k) on CIFAR-10 |  | 2.83 (Song & Dhariwal 2024, iCT) |" in gpu_table
    assert "Song & Dhariwal" not in block.split("gpu-nvidia-h100.json)", 1)[0]
    # In the book (no link prefix) the record is named, not linked.
    book = _block(results.markdown_table(tmp_path), "consistency")
    assert "record `results/consistency/book-cpu.json`" in book and "](" not in book


def test_seed_spread_is_shown_where_a_row_has_one(tmp_path):
    rows = [
        {**results.row("ReNO", "judge accuracy", 0.998, nfe=1), "std": 0.001633, "seeds": 3},
        results.row("one step", "judge accuracy", 0.972, nfe=1),
    ]
    _record(tmp_path, "reno", "book", "cpu", rows, wall_s=None, commit="unknown")
    block = _block(results.markdown_table(tmp_path), "reno")
    assert "| ReNO | 1 | judge accuracy on digits | 0.9980 ± 0.0016 (3 seeds) |  |" in block
    assert "| one step | 1 | judge accuracy on digits | 0.972 |  |" in block
    assert "commit `unknown`, wall time not recorded" in block
    # A paper's remark after ";" leaves the table cell and is said once under the table.
    assert "(Eyring et al. 2024, ReNO) |" in block
    assert block.count("GenEval numbers from the authors' follow-up") == 1
    assert results.value_text({"value": 181.0, "std": 4.5}) == "181.0 ± 4.5"
    assert results.value_text({"value": 0.14, "seeds": 1}) == "0.14"  # one seed: nothing said
    assert results.value_text({"value": 11.35}) == "11.3"  # ours: three significant figures
    assert results.value_text({"value": 11.35}, stated=True) == "11.35"  # a paper's: as stated
    printed = {"value": 0.6, "value_stated": "0.60"}  # the trailing zero the float drops
    assert results.value_text(printed, stated=True) == "0.60"
    geneval = {(p["model"], p.get("value_stated")) for p in results.paper_rows("reno")}
    assert ("SD-Turbo, best-of-50", "0.60") in geneval
    table = results.rows_markdown(
        [{"source": "paper: X", "model": "m", "metric": "FID", "value": 157.5}]
    )
    assert "| 157.5 |" in table
    # The spread to two significant figures, the mean to the same decimal place.
    assert results.mean_std_text(2.7312, 0.0234) == "2.731 ± 0.023"
    assert results.mean_std_text(12834.0, 340.0) == "12834 ± 340"
    assert results.mean_std_text(0.5, 0.0) == "0.5 ± 0"


def test_benchmarks_stay_out_of_the_tables(tmp_path):
    _record(tmp_path, "dmd2", "book", "cpu", [results.row("DMD2", "SWD", 0.2, nfe=1)])
    bench = tmp_path / "benchmarks" / "throughput-cpu.json"
    bench.parent.mkdir()
    # Even a measurement file that names a chapter is not a chapter run.
    bench.write_text(
        json.dumps(
            {
                "chapter": "dmd2",
                "profile": "gpu",
                "device": "cpu",
                "rows": [{"model": "unet", "metric": "images/s", "value": 9}],
                "wall_s": 1.0,
            }
        )
    )
    assert [r["_path"] for r in results.read_records(tmp_path)] == ["dmd2/book-cpu.json"]
    table = results.markdown_table(tmp_path)
    assert "benchmarks" not in table and "images/s" not in table
    # A chapter with papers' numbers and no run says so and still shows the papers.
    assert "No run of this book recorded yet." in _block(table, "consistency")


def test_papers_file_cites_known_references():
    bib = (ROOT / "book" / "references.bib").read_text()
    for p in results.read_papers():
        assert {"chapter", "source", "cite", "model", "dataset", "metric", "value"} <= set(p)
        assert "{" + p["cite"] + "," in bib, f"{p['cite']} missing from references.bib"


def test_every_committed_record_is_complete():
    for p in sorted((ROOT / "results").glob("*/*.json")):
        rec = json.loads(p.read_text())
        if p.parent.name == "benchmarks":  # measurements of their own kind, not chapter runs
            assert {"benchmark", "profile", "device", "commit", "metrics", "wall_s"} <= set(rec), p
            assert rec["device"] in p.stem, p
            continue
        assert {"chapter", "profile", "device", "commit", "metrics", "rows", "wall_s"} <= set(
            rec
        ), p
        seed = f"-seed{rec['seed']}" if rec.get("seed") else ""
        assert p.name == f"{rec['profile']}-{rec['device']}{seed}.json", p


def test_generated_tables_are_up_to_date():
    """README and book/results.md must show exactly what the records say (never typed by hand)."""
    for name, prefix in (("README.md", "results/"), ("book/results.md", None)):
        text = (ROOT / name).read_text()
        block = text.split(results.START, 1)[1].split(results.END, 1)[0]
        expected = "\n" + results.markdown_table(ROOT / "results", prefix)
        assert block == expected, f"{name} is stale: run `make results`"


def test_runs_at_several_seeds_make_one_table_of_means_and_spreads(tmp_path):
    for seed, (fd, swd) in enumerate(((20.0, 0.2), (22.0, 0.3), (24.0, 0.25))):
        rows = [
            results.row("2-RF", "proxy-FD", fd, nfe=1),
            {**results.row("VSD (2-D)", "SWD", swd, nfe=1, dataset="8gaussians"), "seeds": 1},
        ]
        if seed == 0:  # an in-run spread over 3 seeds of its own counts 3 times
            rows[1] |= {"value": 0.2, "std": 0.1, "seeds": 3}
        path = _record(tmp_path, "rectified_flow", "book", "cpu", rows, seed=seed)
        path.rename(path.with_name(f"book-cpu-seed{seed}.json" if seed else "seed0.tmp"))
    (tmp_path / "rectified_flow" / "seed0.tmp").rename(tmp_path / "rectified_flow/book-cpu.json")
    table = results.markdown_table(tmp_path, link_prefix="results/")
    assert table.count("Run: ") == 1  # one run, three seeds
    assert "seed 1 ([results/rectified_flow/book-cpu-seed1.json]" in table
    assert "seed 2 ([results/rectified_flow/book-cpu-seed2.json]" in table
    assert "| 2-RF | 1 | proxy-FD on digits | 22.0 ± 2.0 (3 seeds) |  |" in table
    assert "| VSD (2-D) | 1 | SWD on 8gaussians | 0.230 ± 0.084 (5 seeds) |  |" in table


def test_seed_summary_pools_this_chapters_seeds(tmp_path):
    s = profiles.resolve("foundations", "ci")
    assert "Only one seed" in results.seed_summary("foundations", s, root=tmp_path)
    for seed, v in ((0, 1.0), (1, 3.0)):
        rows = [results.row("teacher", "proxy-FD", v, nfe=4, dataset="digits")]
        settings = profiles.resolve("foundations", "ci", seed=seed)
        results.write_record("foundations", settings, {}, rows, root=tmp_path)
    text = results.seed_summary("foundations", s, root=tmp_path)
    assert "seed 1 (`results/foundations/ci-cpu-seed1.json`)" in text
    assert "| teacher | 4 | proxy-FD on digits | 2.0 ± 1.4 (2 seeds) |\n" in text
    assert "| model | NFE | metric | ours |\n" in text  # no papers here: no empty paper column
    assert "over all the seeds.\n" in text


def test_tables_list_chapters_in_the_books_order(tmp_path):
    for chapter in ("dmd2", "foundations", "consistency"):
        _record(tmp_path, chapter, "book", "cpu", [results.row("m", "SWD", 0.2, nfe=1)])
    table = results.markdown_table(tmp_path)
    heads = [ln.strip("*") for ln in table.splitlines() if ln.startswith("**")]
    assert heads.index("foundations") < heads.index("consistency") < heads.index("dmd2")


def test_records_say_which_cpu_ran_them():
    cpu = results.environment()["cpu"]
    assert cpu["cores"] >= 1 and cpu["torch_threads"] >= 1 and cpu["model"]


def test_a_measurement_that_asks_for_it_follows_the_chapters_tables(tmp_path):
    rows = [results.row("real test images", "FID (10k)", 5.25, dataset="CIFAR-10 (JPEG copy)")]
    rows[0] |= {"samples": 10000, "reference": 50000}
    rec = results.benchmark_record("FID floor", None, "cpu", {"fid": {"x": 5.25}}, 3700.0)
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "fid-floor-cpu.json").write_text(json.dumps(rec | {"rows": rows, "in_tables": True}))
    (bench / "throughput-cpu.json").write_text(json.dumps(rec | {"rows": rows}))  # not asked
    assert [r["_path"] for r in results.read_measurements(tmp_path)] == [
        "benchmarks/fid-floor-cpu.json"
    ]
    table = results.markdown_table(tmp_path, link_prefix="results/")
    block = _block(table, "FID floor")
    assert block.startswith("\nMeasurement: on `cpu`, commit ")
    assert "wall time 1 h 01 min" in block and "profile" not in block
    assert "[results/benchmarks/fid-floor-cpu.json](results/benchmarks/fid-floor-cpu.json)" in block
    assert "| real test images |  | FID (10k) against 50k on CIFAR-10 | 5.25 |" in block
    assert "throughput" not in table and table.count("real test images") == 1


def test_tables_with_papers_numbers_give_both_training_budgets():
    ours = {"chapter": "consistency", "profile": "gpu", "device": "nvidia-h100", "wall_s": 64}
    ch00 = {"chapter": "foundations", "profile": "gpu", "device": "nvidia-h100", "seed": 0}
    ch00["metrics"] = {"teacher_train_wall_s": 89.3}
    ect = {"model": "ECT", "source": "Geng et al. 2025 (ECT)", "budget": "one A100, 1 hour"}
    papers = [ect, ect | {"model": "ECT, 2 steps"}, {"model": "CT", "source": "Song (CT)"}]
    line = results.budget_line([ours | {"seed": 0}], papers, [ch00])
    assert line == (
        "Training budgets: this run, 1 min 04 s on `nvidia-h100`, plus chapter 00's teacher "
        "(1 min 29 s of training in its record); ECT (Geng et al. 2025, ECT): one A100, 1 hour."
    )  # one entry per paper and budget; a paper without a budget is left out
    own = results.budget_line([ch00 | {"wall_s": 214}], papers, [ch00])
    assert "3 min 34 s on `nvidia-h100` (1 min 29 s of it training the teacher)" in own
    other_device = results.budget_line([ours | {"device": "cpu"}], papers, [ch00])
    assert "teacher" not in other_device.split(";")[0]  # chapter 00 ran elsewhere: not added
    assert results.budget_line([ours], papers[2:], [ch00]) == ""  # no budget stated: no line


def test_the_chapters_said_to_load_the_teacher_are_the_ones_that_do():
    users = {
        results.CHAPTERS[int(p.name[:2])]
        for p in (ROOT / "notebooks").glob("0*.ipynb")
        if "teachers.get_teacher(" in p.read_text() and not p.name.startswith("00")
    }
    assert users == set(results.TEACHER_USERS)
