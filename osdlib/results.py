"""Result records: every number the book reports comes from one of these files.

A run writes ``results/<chapter>/<profile>-<device>.json`` with its metrics, table rows,
profile, resolved settings, seed, wall time, device, osdlib version, git commit and
dataset. :func:`markdown_table` builds the reproduction table from the records next to the
papers' numbers (``osdlib/papers.json``, with citations); ``python -m osdlib.results``
rewrites the generated blocks of ``README.md`` and ``book/results.md``.
"""

from __future__ import annotations

import json
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
    """Write ``<root>/<chapter>/<profile>-<device>.json`` and return its path."""
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
        "osdlib_version": __version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if settings.get("fid"):  # which Inception weights the FIDs used (fp16 files say so)
        from .metrics import find_inception_weights

        weights = find_inception_weights()
        record["fid_weights"] = weights.name if weights else "torch-fidelity download"
    path = Path(root or results_dir()) / chapter / f"{settings['profile']}-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_records(root: str | Path | None = None) -> list[dict]:
    """Every record under ``root`` (``results/<chapter>/*.json``), sorted by chapter and name."""
    root = Path(root or results_dir())
    out = []
    for p in sorted(root.glob("*/*.json")):
        rec = json.loads(p.read_text())
        if "chapter" not in rec:  # e.g. results/benchmarks/: measurements, not chapter runs
            continue
        rec["_path"] = str(p.relative_to(root))
        out.append(rec)
    return out


PAPERS = Path(__file__).with_name("papers.json")


def read_papers() -> list[dict]:
    """The papers' published numbers, with citations (``osdlib/papers.json``)."""
    return json.loads(PAPERS.read_text())["rows"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def rows_markdown(rows: list[dict]) -> str:
    """A markdown table of rows with keys source, model, dataset, nfe, metric, value."""
    lines = ["| source | model | dataset | NFE | metric | value |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['source']} | {r['model']} | {r.get('dataset', '')} | {_fmt(r.get('nfe'))} | "
        f"{r['metric']} | {_fmt(r['value'])} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def paper_rows(chapter: str) -> list[dict]:
    """The papers' numbers for one chapter, with ``source`` naming the paper."""
    return [
        {**p, "source": f"paper: {p['source']}"} for p in read_papers() if p["chapter"] == chapter
    ]


def markdown_table(root: str | Path | None = None, link_prefix: str | None = None) -> str:
    """The reproduction table: this book's runs, then the papers' numbers, per chapter.

    Each run links to its record at ``link_prefix + path`` (or names the path when None).
    """
    records = read_records(root)
    chapters = sorted({r["chapter"] for r in records} | {p["chapter"] for p in read_papers()})
    parts = []
    for ch in chapters:
        rows = []
        for rec in (r for r in records if r["chapter"] == ch):
            where = (
                f"[record]({link_prefix}{rec['_path']})"
                if link_prefix is not None
                else f"`results/{rec['_path']}`"
            )
            src = f"this book, `{rec['profile']}` on {rec['device']} ({where})"
            rows += [
                {**rw, "dataset": rw.get("dataset") or rec["dataset"], "source": src}
                for rw in rec["rows"]
            ]
        parts.append(f"**{ch}**\n\n" + rows_markdown(rows + paper_rows(ch)))
    return "\n".join(parts)


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
