"""The frontier reads the chapters' records: every listed model is found, with provenance."""

import json

from osdlib import frontier, results


def test_every_listed_model_is_in_the_committed_book_records():
    records = [r for r in frontier.load_records() if r["profile"] == "book"]
    chapters = [r["chapter"] for r in records]
    assert chapters == sorted(chapters, key=results.CHAPTERS.index)  # the book's order
    images = {(r["chapter"], r["model"]) for r in frontier.image_rows(records)}
    for chapter, models in frontier.IMAGE_MODELS.items():
        for _, name, _ in models:
            assert (chapter, name) in images, f"{chapter}: {name} missing from its record"
    toys = {(r["chapter"], r["model"]) for r in frontier.toy_rows(records)}
    for chapter, models in frontier.TOY_MODELS.items():
        for _, name in models:
            assert (chapter, name) in toys, f"{chapter}: toy {name} missing from its record"


def _write(root, chapter, name, record):
    (root / chapter).mkdir(parents=True, exist_ok=True)
    (root / chapter / name).write_text(json.dumps(record))


def test_rows_carry_cost_spread_and_provenance(tmp_path):
    base = {"profile": "book", "device": "cpu", "commit": "0123456789abc", "wall_s": 60.0}
    image = [
        {"model": "ECT (from the teacher)", "nfe": 1, "accuracy": 0.9, "accuracy_std": 0.01}
        | {"proxy_fd": 50.0, "within_class_std": 0.3, "seeds": 3},
        {"model": "something else", "nfe": 1, "accuracy": 0.1},
    ]
    metrics = {"image": image, "train_steps": {"ECT (from the teacher)": 100}}
    metrics["train_wall_s"] = {"ECT (from the teacher)": 12.0}
    metrics["toy"] = [{"model": "CT", "nfe": 1, "swd": 0.2, "modes": 8}]
    metrics["toy"] += [{"model": "CT", "nfe": 4, "swd": 0.1, "modes": 8}]
    _write(
        tmp_path,
        "consistency",
        "book-cpu.json",
        base
        | {"chapter": "consistency"}
        | {"metrics": metrics, "settings": {"batch": 64}, "dataset": "digits"},
    )
    _write(tmp_path, "benchmarks", "x.json", {"rows": []})
    records = frontier.load_records(tmp_path)
    assert [r["path"] for r in records] == ["consistency/book-cpu.json"]
    (row,) = frontier.image_rows(records)
    assert row["model"] == "ECT" and row["family"] == "consistency"
    assert row["accuracy_std"] == 0.01 and row["seeds"] == 3
    assert row["images_seen"] == 6400 and row["train_wall_s"] == 12.0
    assert row["record"] == "consistency/book-cpu.json" and row["commit"] == "0123456"
    toy = frontier.toy_rows(records)
    assert [(r["model"], r["nfe"]) for r in toy] == [("CT", 1)]  # NFE above 2 left out


def test_records_of_several_seeds_are_pooled(tmp_path):
    def record(seed, fd, swd):
        image = [{"model": "VSD", "nfe": 1, "accuracy": 0.9, "proxy_fd": fd}]
        toy = [{"model": "VSD, online fake score", "nfe": 1, "swd": swd, "seeds": 1, "modes": 8}]
        head = {"chapter": "score_distillation", "profile": "book", "device": "cpu", "seed": seed}
        return head | {"metrics": {"image": image, "toy": toy, "train_steps": {"VSD": 10}}}

    for seed, fd, swd in ((0, 30.0, 0.2), (1, 34.0, 0.3), (2, 32.0, 0.25)):
        name = f"book-cpu-seed{seed}.json" if seed else "book-cpu.json"
        _write(tmp_path, "score_distillation", name, record(seed, fd, swd))
    records = frontier.load_records(tmp_path)
    (row,) = frontier.image_rows(records)
    assert row["proxy_fd"] == 32.0 and row["proxy_fd_std"] == 2.0 and row["seeds"] == 3
    assert row["record"] == "score_distillation/book-cpu.json" and row["seed"] == 0
    assert len(row["seed_records"]) == 3 and row["train_steps"] == 10
    (toy,) = frontier.toy_rows(records)
    assert toy["swd"] == 0.25 and toy["seeds"] == 3 and toy["modes"] == 8


def test_reno_rows_mean_and_spread(tmp_path):
    summary = [
        {"generator": "G", "variant": "ReNO", "reward": [-0.1, 0.01], "judge_accuracy": [0.9, 0.02]}
    ]
    _write(
        tmp_path,
        "reno",
        "book-cpu.json",
        {"chapter": "reno", "profile": "book"}
        | {"device": "cpu", "metrics": {"summary": summary}, "rows": [{"seeds": 3}]},
    )
    (row,) = frontier.reno_rows(frontier.load_records(tmp_path))
    assert row["reward"] == -0.1 and row["reward_std"] == 0.01 and row["seeds"] == 3


def test_default_reads_committed_records_and_the_current_results_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OSD_RESULTS_DIR", str(tmp_path))
    committed = frontier.load_records()
    assert committed and all(r["profile"] != "ci-test" for r in committed)
    _write(tmp_path, "dmd2", "ci-test-cpu.json", {"chapter": "dmd2", "profile": "ci-test"})
    _write(tmp_path, "foundations", "book-cpu.json", {"chapter": "foundations", "profile": "x"})
    records = frontier.load_records()
    paths = [r["path"] for r in records]
    assert "dmd2/ci-test-cpu.json" in paths and len(paths) == len(committed) + 1
    assert next(r for r in records if r["path"] == "foundations/book-cpu.json")["profile"] == "x"
    assert results.results_dir() == tmp_path


def test_records_are_listed_in_chapter_then_seed_order(tmp_path):
    for name, seed in (
        ("book-cpu-seed2.json", 2),
        ("book-cpu.json", 0),
        ("book-cpu-seed1.json", 1),
    ):
        rec = {"chapter": "dmd2", "profile": "book", "device": "cpu", "seed": seed, "metrics": {}}
        _write(tmp_path, "dmd2", name, rec)
    _write(tmp_path, "foundations", "book-cpu-seed1.json", rec | {"chapter": "foundations"})
    paths = [r["path"] for r in frontier.load_records(tmp_path)]
    assert paths == [
        "foundations/book-cpu-seed1.json",
        "dmd2/book-cpu.json",
        "dmd2/book-cpu-seed1.json",
        "dmd2/book-cpu-seed2.json",
    ]


def test_plot_leaves_out_rows_without_the_metric():
    """At `gpu` a chapter computes FID only for some rows (chapter 01: the pictured ones);
    the FID frontier must plot the others' points and skip the missing, not fail."""
    import matplotlib

    matplotlib.use("Agg")
    rows = [
        {"model": "2-RF (reflow)", "family": "rectified flow", "nfe": 1, "fid": 30.0},
        {"model": "2-RF (reflow)", "family": "rectified flow", "nfe": 2},  # no FID computed
        {"model": "flow teacher, Euler", "family": "teacher", "nfe": 4, "fid": 20.0},
        {"model": "ECT", "family": "consistency", "nfe": 1, "ms_per_image": 0.02, "fid": 40.0},
        {"model": "ECT", "family": "consistency", "nfe": 2, "ms_per_image": 0.04},
    ]
    for r in rows[:3]:
        r["ms_per_image"] = 0.02 * r["nfe"]
    fig = frontier.plot(rows, "fid", "FID")
    left, right = fig.axes[:2]
    for ax in (left, right):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert list(lines["2-RF (reflow) (line)"].get_ydata()) == [30.0]
        (ect,) = [c for c in ax.collections if c.get_label() == "ECT"]
        assert len(ect.get_offsets()) == 1


def test_a_run_whose_students_lack_fid_is_plotted_by_proxy_fd_without_empty_legend_entries():
    """A gpu chain that skipped the students' FIDs (only the teacher has them) is plotted
    by proxy-FD, and a model with no point of the plotted metric gets no legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    teacher = {"model": "flow teacher, Euler", "family": "teacher", "proxy_fd": 400.0}
    rows = [teacher | {"nfe": 1, "fid": 350.0}, teacher | {"nfe": 2, "fid": 220.0}]
    rows += [{"model": "ECT", "family": "consistency", "nfe": 1, "proxy_fd": 70.0}]
    assert frontier.quality_metric(rows)[0] == "proxy_fd"
    assert frontier.quality_metric(rows + [rows[2] | {"fid": 60.0}])[0] == "fid"
    reflow = {"model": "2-RF (reflow)", "family": "rectified flow", "nfe": 1, "fid": 90.0}
    assert frontier.quality_metric(rows + [reflow])[0] == "fid"  # a student, drawn as a line
    ar = {"model": "AR teacher (token by token)", "family": "autoregressive", "fid": 9.0}
    assert frontier.quality_metric(rows + [ar])[0] == "proxy_fd"  # another teacher
    for r in rows:
        r["ms_per_image"] = 0.05 * r["nfe"]
    labels = [t.get_text() for t in frontier.plot(rows, "fid", "FID").legends[0].get_texts()]
    assert labels == ["flow teacher, Euler (line)"]  # no ECT, no empty 2-RF line
