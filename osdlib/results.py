"""Result records: every number the book reports comes from one of these files.

A run writes ``results/<chapter>/<profile>-<device>.json`` with its metrics, table rows,
profile, resolved settings, seed, wall time, device, osdlib version, git commit and
dataset. :func:`markdown_table` builds the reproduction tables from the records next to the
papers' numbers (``osdlib/papers.json``, with citations): per chapter, one provenance line per
run (profile, device, seed, commit, wall time, data, record) above a compact table
``model | NFE | metric | ours | paper``. ``python -m osdlib.results`` rewrites the generated
blocks of ``README.md`` and ``book/results.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__

START, END = "<!-- results:start -->", "<!-- results:end -->"


def repo_root() -> Path | None:
    """The checkout this osdlib was installed from (editable install), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() and (root / "results").is_dir() else None


def results_dir() -> Path:
    """``$OSD_RESULTS_DIR``, else the checkout's ``results/``, else ``./results``."""
    if "OSD_RESULTS_DIR" in os.environ:
        return Path(os.environ["OSD_RESULTS_DIR"])
    root = repo_root()
    return root / "results" if root else Path("results")


def device_name(device: str | torch.device = "cpu") -> str:
    """A short file-name-safe device label: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return device.type


def git_commit() -> str:
    """The commit of the checkout (with ``+dirty`` when it has uncommitted changes).

    ``$OSD_GIT_COMMIT`` overrides it: a copy of the checkout without its ``.git`` folder (an
    offline GPU node, see ``scripts/offline_run.sh``) records the commit it was made from.
    """
    if os.environ.get("OSD_GIT_COMMIT"):
        return os.environ["OSD_GIT_COMMIT"]
    root = repo_root() or Path.cwd()
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return round(v, 6)
    return v


def row(
    model: str, metric: str, value: float, nfe: int | None = None, dataset: str = "", **extra: Any
) -> dict:
    """One line of the reproduction table."""
    return {
        "model": model,
        "dataset": dataset,
        "nfe": nfe,
        "metric": metric,
        "value": value,
        **extra,
    }


# the chapters' record names in the book's order (00 ... 07); tables list chapters this way
CHAPTERS = (
    "foundations",
    "rectified_flow",
    "consistency",
    "score_distillation",
    "dmd2",
    "reno",
    "distilled_decoding",
    "frontier",
)
# the chapters that load chapter 00's teacher (teachers.get_teacher) instead of training one
TEACHER_USERS = ("rectified_flow", "consistency", "score_distillation", "dmd2", "reno")


def chapter_rank(chapter: str) -> int:
    """A chapter's place in the book (its number: 0 for foundations); unknown names last."""
    return CHAPTERS.index(chapter) if chapter in CHAPTERS else len(CHAPTERS)


def cpu_info() -> dict:
    """The CPU a run had: its model name (where the system says it), the logical cores the
    process may use and torch's intra-op threads: timings on a CPU depend on all three."""
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name
            )
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": name or "unknown", "cores": cores, "torch_threads": torch.get_num_threads()}


def environment() -> dict:
    """How any record was made besides its own settings: the osdlib version, git commit,
    torch and Python versions, platform, CPU and time of writing."""
    return {
        "osdlib_version": __version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def benchmark_record(
    name: str, profile: Any, device: str, metrics: dict, wall_s: float, **extra: Any
) -> dict:
    """A record of ``results/benchmarks/`` (a measurement that is not a chapter run): which
    benchmark, at which profile's sizes, on which device, what it measured (``metrics``) and
    how long it took, with the :func:`environment` every chapter record carries."""
    return {
        "benchmark": name,
        "profile": profile,
        "device": device,
        "metrics": metrics,
        "wall_s": wall_s,
        **environment(),
        **extra,
    }


def write_record(
    chapter: str,
    settings: dict,
    metrics: dict,
    rows: list[dict] | None = None,
    dataset: str = "",
    wall_s: float | None = None,
    params: dict | None = None,
    extra: dict | None = None,
    root: str | Path | None = None,
) -> Path:
    """Write ``<root>/<chapter>/<profile>-<device>.json`` and return its path.

    A run with a seed other than 0 (``make seeds``) writes ``<profile>-<device>-seed<N>.json``
    beside it, so that the runs of several seeds are kept side by side (:func:`record_groups`).
    """
    device = device_name(settings.get("device", "cpu"))
    record = {
        "chapter": chapter,
        "profile": settings["profile"],
        "device": device,
        "seed": settings.get("seed"),
        "dataset": dataset,
        "metrics": metrics,
        "rows": rows or [],
        "wall_s": wall_s,
        "params": params or {},
        "settings": dict(settings),
        **environment(),
        **(extra or {}),
    }
    if settings.get("fid"):  # which Inception weights the FIDs used (fp16 files say so)
        from .metrics import find_inception_weights

        weights = find_inception_weights()
        record["fid_weights"] = weights.name if weights else "torch-fidelity download"
    seed = settings.get("seed") or 0
    name = f"{settings['profile']}-{device}" + (f"-seed{seed}" if seed else "")
    path = Path(root or results_dir()) / chapter / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_records(root: str | Path | None = None) -> list[dict]:
    """Every chapter record under ``root`` (``results/<chapter>/*.json``), sorted by path.

    ``results/benchmarks/`` holds measurements of another kind (throughput, timings of whole
    chains), not chapter runs, and ``results/frontier/`` chapter 07's reading of the other
    records (no numbers of its own to tabulate): they are left out, as is any file without a
    ``chapter``.
    """
    root = Path(root or results_dir())
    out = []
    for p in sorted(root.glob("*/*.json")):
        if p.parent.name in ("benchmarks", "frontier"):
            continue
        rec = json.loads(p.read_text())
        if "chapter" not in rec:
            continue
        rec["_path"] = p.relative_to(root).as_posix()
        out.append(rec)
    return out


def read_measurements(root: str | Path | None = None) -> list[dict]:
    """The records of ``results/benchmarks/`` that ask to be tabulated with the chapters'
    (``"in_tables": true`` and table ``rows``: a measurement that sets a chapter's numbers in
    context, such as the FID of real images), sorted by path."""
    root = Path(root or results_dir())
    out = []
    for p in sorted((root / "benchmarks").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("in_tables") and rec.get("rows"):
            out.append(rec | {"_path": p.relative_to(root).as_posix()})
    return out


PAPERS = Path(__file__).with_name("papers.json")
PROFILES = ("ci", "book", "gpu", "paper")  # the order in which a chapter's runs are listed


def read_papers() -> list[dict]:
    """The papers' published numbers, with citations (``osdlib/papers.json``)."""
    return json.loads(PAPERS.read_text())["rows"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def mean_std_text(mean: float, std: float) -> str:
    """``mean ± std`` with the spread to two significant figures and the mean to the same
    decimal place: ``(2.7312, 0.0234)`` -> ``2.731 ± 0.023``, ``(181.04, 2.3)`` -> ``181.0 ± 2.3``."""
    if not math.isfinite(std) or std <= 0:
        return f"{_fmt(float(mean))} ± {0 if std == 0 else std}"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def value_text(r: dict, stated: bool = False) -> str:
    """A row's value; with its seed spread when the row has one: ``0.9720 ± 0.0075 (3 seeds)``.

    A row measured over several seeds carries the mean as ``value``, its standard deviation
    as ``std`` and the number of seeds as ``seeds``. ``stated``: a paper's number, shown as
    the paper states it (11.35, not 11.3).
    """
    value, std = r.get("value"), r.get("std")
    if stated and r.get("value_stated"):  # as printed, trailing zeros included (0.60)
        text = r["value_stated"]
    elif stated and isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (int, float)) and isinstance(std, (int, float)):
        text = mean_std_text(value, std)
    else:
        text = _fmt(value) + ("" if std is None else f" ± {std}")
    if r.get("seeds") and r["seeds"] > 1:  # one seed is every other row's case: said nowhere
        text += f" ({r['seeds']} seeds)"
    return text


def rows_markdown(rows: list[dict]) -> str:
    """A markdown table of rows with keys source, model, dataset, nfe, metric, value."""
    lines = ["| source | model | dataset | NFE | metric | value |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['source']} | {r['model']} | {r.get('dataset', '')} | {_fmt(r.get('nfe'))} | "
        f"{r['metric']} | {value_text(r, stated=r['source'].startswith('paper'))} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def paper_rows(chapter: str) -> list[dict]:
    """The papers' numbers for one chapter, with ``source`` naming the paper."""
    return [
        {**p, "source": f"paper: {p['source']}"} for p in read_papers() if p["chapter"] == chapter
    ]


def short_dataset(dataset: str) -> str:
    """``digits (sklearn.datasets.load_digits, 1797 images)`` -> ``digits``."""
    return dataset.split(" (", 1)[0].strip()


def cite_short(source: str) -> tuple[str, str]:
    """A paper's citation in short form, and the remark it carried (or "").

    ``Eyring et al. 2024 (ReNO; GenEval numbers from ...)`` -> ``Eyring et al. 2024, ReNO``
    and ``GenEval numbers from ...``; ``Song & Dhariwal 2024 (iCT)`` -> ``Song & Dhariwal
    2024, iCT``.
    """
    m = re.fullmatch(r"(.*?)\s*\((.*)\)\s*", source)
    if not m:
        return source, ""
    who, inside = m.groups()
    name, _, remark = inside.partition(";")
    return f"{who}, {name.strip()}", remark.strip()


def wall_text(seconds: float | None) -> str:
    """``570.8`` -> ``9 min 31 s``; ``None`` -> ``not recorded``."""
    if seconds is None:
        return "not recorded"
    s = round(float(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _where(rec: dict, link_prefix: str | None) -> str:
    path = f"results/{rec['_path']}"
    return f"[{path}]({link_prefix}{rec['_path']})" if link_prefix is not None else f"`{path}`"


def provenance(rec: dict, link_prefix: str | None = None, others: list[dict] = ()) -> str:
    """One line that says which run a table comes from, and links to its record; ``others``
    are the same run at other seeds, whose records the line links too."""
    where = _where(rec, link_prefix)
    commit = str(rec.get("commit") or "unknown")
    sha, plus, rest = commit.partition("+")
    short = (sha[:7] if re.fullmatch(r"[0-9a-f]{8,40}", sha) else sha) + plus + rest
    on = f"`{rec['profile']}` profile on " if rec.get("profile") else "on "
    parts = [on + f"`{rec['device']}`"]
    if rec.get("seed") is not None:
        parts.append(f"seed {rec['seed']}")
    parts += [f"commit `{short}`", f"wall time {wall_text(rec.get('wall_s'))}"]
    if rec.get("dataset"):
        parts.append(f"data: {rec['dataset']}")
    kind = "Run" if "chapter" in rec else "Measurement"
    line = f"{kind}: " + ", ".join(parts) + f"; record {where}"
    if others:
        seeds = ", ".join(f"seed {o.get('seed')} ({_where(o, link_prefix)})" for o in others)
        line += f". The same run at {seeds}: values are mean ± std over all the seeds."
    return line


def record_groups(records: list[dict]) -> list[list[dict]]:
    """The records of one run at several seeds (same chapter, profile and device) grouped,
    the lowest seed first; the groups in chapter, then profile order."""
    groups: dict[tuple, list[dict]] = {}
    for rec in sorted(records, key=lambda r: (r["chapter"], _profile_key(r), r.get("seed") or 0)):
        groups.setdefault((rec["chapter"], *_profile_key(rec)), []).append(rec)
    return list(groups.values())


def pool_rows(records: list[dict]) -> list[dict]:
    """The table rows of one run at several seeds (:func:`record_groups`), pooled: for each
    (model, metric, NFE, data) the mean over every seed with its standard deviation and the
    number of seeds; a row that is itself a mean over seeds (``seeds``, ``std``) counts each
    of them (:func:`osdlib.metrics.pooled`). Rows in the order of the first record."""
    from .metrics import pool_columns

    keyed: dict[tuple, list[dict]] = {}
    for rec in records:
        seen: dict[tuple, int] = {}
        for rw in rec["rows"]:
            rw = {**rw, "dataset": rw.get("dataset") or rec.get("dataset", "")}
            key = (rw["model"], rw["metric"], rw.get("nfe"), rw["dataset"])
            seen[key] = seen.get(key, 0) + 1  # a row repeated within one record stays apart
            keyed.setdefault((*key, seen[key]), []).append(rw)
    pooled = (pool_columns(rws, ["value"], std=lambda _: "std") for rws in keyed.values())
    return [
        rws[0] | (p if len(rws) > 1 else {}) for rws, p in zip(keyed.values(), pooled, strict=True)
    ]


def compact_table(ours: list[dict], papers: list[dict]) -> str:
    """``model | NFE | metric | ours | paper``: this run's rows, then the papers' numbers (the
    ``paper`` column only where there are papers' numbers).

    The metric column names the data it was measured on (short form); a paper's number carries
    its citation in short form.
    """

    from .metrics import count_label

    def metric(r: dict) -> str:
        m = r["metric"]
        if r.get("reference"):  # a distance to a reference set whose size the row gives
            m += f" against {count_label(r['reference'])}"
        data = short_dataset(r.get("dataset") or "")
        return f"{m} on {data}" if data else m

    paper_col = "  |" if papers else ""  # no paper column in a table without papers' numbers
    lines = [f"| model | NFE | metric | ours |{' paper |' if papers else ''}"]
    lines += [f"|---|---|---|---|{'---|' if papers else ''}"]
    lines += [
        f"| {r['model']} | {_fmt(r.get('nfe'))} | {metric(r)} | {value_text(r)} |{paper_col}"
        for r in ours
    ]
    lines += [
        f"| {p['model']} | {_fmt(p.get('nfe'))} | {metric(p)} |  | "
        f"{value_text(p, stated=True)} ({cite_short(p['source'])[0]}) |"
        for p in papers
    ]
    remarks = dict.fromkeys(
        f"{cite_short(p['source'])[0]}: {cite_short(p['source'])[1]}."
        for p in papers
        if cite_short(p["source"])[1]
    )
    return "\n".join(lines) + "\n" + "".join(f"\n{r}\n" for r in remarks)


def budget_line(run: list[dict], papers: list[dict], records: list[dict]) -> str:
    """Training budgets next to a table with papers' numbers: this run's wall time on its
    device (with the chapter-00 teacher's training time when the chapter loads it), then each
    paper's budget as stated in ``papers.json``; "" when no paper there states one."""
    stated: dict[tuple, str] = {}  # one entry per paper and budget, named by its first model
    for p in (p for p in papers if p.get("budget")):
        cite = cite_short(p["source"])[0]
        stated.setdefault((cite, p["budget"]), f"{p['model']} ({cite}): {p['budget']}")
    if not stated:
        return ""
    rec = run[0]
    ours = f"this run, {wall_text(rec.get('wall_s'))} on `{rec['device']}`"
    teacher = next(
        (
            r["metrics"]["teacher_train_wall_s"]
            for r in records
            if r["chapter"] == "foundations"
            and (r["profile"], r["device"], r.get("seed")) == (rec["profile"], rec["device"], 0)
            and "teacher_train_wall_s" in r.get("metrics", {})
        ),
        None,
    )
    if rec["chapter"] == "foundations" and teacher is not None:
        ours += f" ({wall_text(teacher)} of it training the teacher)"
    elif teacher is not None and rec["chapter"] in TEACHER_USERS:
        ours += f", plus chapter 00's teacher ({wall_text(teacher)} of training in its record)"
    return "Training budgets: " + "; ".join([ours, *stated.values()]) + "."


def _profile_key(rec: dict) -> tuple:
    p = rec.get("profile", "")
    return (PROFILES.index(p) if p in PROFILES else len(PROFILES), p, rec.get("device", ""))


def markdown_table(root: str | Path | None = None, link_prefix: str | None = None) -> str:
    """The reproduction tables: per chapter, each run's provenance line and its compact table.

    A chapter with several runs (profiles, devices) gets one line and one table per run; the
    records of one run at several seeds make one table of means ± std (:func:`pool_rows`). The
    papers' numbers go to the table of the first run that measured the same metric on the
    same data, else to the chapter's last run (the largest profile). Each run links to its
    record at ``link_prefix + path`` (or names the path when None).
    """
    records = read_records(root)
    papers = read_papers()
    found = {r["chapter"] for r in records} | {p["chapter"] for p in papers}
    chapters = sorted(found, key=lambda c: (chapter_rank(c), c))
    groups = record_groups(records)
    parts = []
    for ch in chapters:
        runs = [g for g in groups if g[0]["chapter"] == ch]  # one run = its seeds' records
        theirs: list[list[dict]] = [[] for _ in runs] or [[]]
        for p in (p for p in papers if p["chapter"] == ch):
            same = [
                i
                for i, (rec, *_) in enumerate(runs)
                if any(
                    rw["metric"] == p["metric"]
                    and short_dataset(rw.get("dataset") or rec["dataset"]) == p["dataset"]
                    for rw in rec["rows"]
                )
            ]
            theirs[same[0] if same else -1].append(p)
        blocks = [
            f"{provenance(run[0], link_prefix, run[1:])}\n\n"
            + compact_table(pool_rows(run), pp)
            + (f"\n{line}\n" if (line := budget_line(run, pp, records)) else "")
            for run, pp in zip(runs, theirs)
        ]
        if not runs:
            blocks = [f"No run of this book recorded yet.\n\n{compact_table([], theirs[0])}"]
        parts.append(f"**{ch}**\n\n" + "\n".join(blocks))
    for rec in read_measurements(root):
        parts.append(
            f"**{rec['benchmark']}**\n\n{provenance(rec, link_prefix)}\n\n"
            + compact_table(rec["rows"], [])
        )
    return "\n".join(parts)


def seed_summary(chapter: str, settings: dict, root: str | Path | None = None) -> str:
    """Markdown for the end of a chapter: its record's rows pooled over every seed recorded
    for the same profile and device (``make seeds``), mean ± std, with the records linked by
    path; or a sentence saying that only one seed is recorded."""
    device = device_name(settings.get("device", "cpu"))
    run = next(
        (
            g
            for g in record_groups(read_records(root))
            if (g[0]["chapter"], g[0]["profile"], g[0]["device"])
            == (chapter, settings["profile"], device)
        ),
        [],
    )
    if len(run) < 2:
        return (
            f"Only one seed of this chapter is recorded at `{settings['profile']}` on `{device}`; "
            "`make seeds` re-runs it at others and this table then gives mean ± std over them."
        )
    return f"{provenance(run[0], None, run[1:])}\n\n" + compact_table(pool_rows(run), [])


def replace_block(text: str, block: str) -> str:
    """Replace what stands between the START and END markers of ``text`` with ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"markers {START} ... {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def update_files(
    root: str | Path | None = None, files: tuple[str, ...] = ("README.md", "book/results.md")
) -> list[Path]:
    """Rewrite the generated table in each of ``files`` (relative to the checkout)."""
    base = repo_root() or Path.cwd()
    res = Path(root) if root else base / "results"
    changed = []
    for name in files:
        path = base / name
        block = markdown_table(res, "results/" if name == "README.md" else None)
        new = replace_block(path.read_text(), block)
        if new != path.read_text():
            path.write_text(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in update_files():
        print(f"updated {p}")
