"""The frontier: every one- and few-step generator of the book side by side, from records.

Nothing here trains or samples. :func:`load_records` reads the result records that the
chapters wrote (``results/<chapter>/<profile>-<device>[-seed<N>].json``), and the ``*_rows`` functions
pick out of them the rows that belong on one comparison, with the record, commit, profile and
device each row comes from:

* :func:`image_rows` — the image generators (digits at ``book``, CIFAR-10 at ``gpu``): class
  accuracy, proxy-FD, within-class std and FID where the run computed it, with NFE and the
  training cost of the stage that made the generator (steps, images seen, wall time);
* :func:`toy_rows` — the 2-D generators on the 8 Gaussians (sliced Wasserstein distance);
* :func:`reno_rows` — ReNO on top of the one-step generators (its own task and metrics).

:data:`IMAGE_MODELS` and :data:`TOY_MODELS` list which rows of which chapter are shown, under
which name; a chapter that renames a model must update them (a test checks that every
listed model is found in the committed records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import CHAPTERS, chapter_rank, read_records, repo_root, results_dir

# chapter -> [(model name in the record, name in the frontier, method family)]
IMAGE_MODELS: dict[str, list[tuple[str, str, str]]] = {
    "foundations": [("euler", "flow teacher, Euler", "teacher")],
    "rectified_flow": [
        ("2-RF", "2-RF (reflow)", "rectified flow"),
        ("2-RF distilled, k=1", "2-RF distilled, 1 step", "rectified flow"),
        ("2-RF distilled, k=2", "2-RF distilled, 2 steps", "rectified flow"),
        ("2-RF distilled, k=4", "2-RF distilled, 4 steps", "rectified flow"),
        ("SlimFlow: flow-guided, k=1", "SlimFlow (smaller net)", "rectified flow"),
    ],
    "consistency": [
        ("ECT (from the teacher)", "ECT", "consistency"),
        ("iCT, ECT's total steps", "iCT (no teacher)", "consistency"),
    ],
    "score_distillation": [
        ("Diff-Instruct", "Diff-Instruct", "score distillation"),
        ("VSD", "VSD", "score distillation"),
        ("DMD", "DMD (gradient only)", "score distillation"),
    ],
    "dmd2": [
        ("DMD (1:1 + regression)", "DMD (+ regression)", "score distillation"),
        ("+ GAN (DMD2)", "DMD2", "score distillation"),
        ("DMD2, 4 steps (backward simulation)", "DMD2, 4 steps", "score distillation"),
    ],
    "distilled_decoding": [
        ("AR teacher, sampled (KV cache)", "AR teacher (token by token)", "autoregressive"),
        ("DD student, 1 step", "DD, 1 step", "autoregressive"),
        ("DD student, 2 steps", "DD, 2 steps", "autoregressive"),
        ("naive one step (independent marginals)", "naive one step (AR)", "autoregressive"),
    ],
}

# chapter -> [(model name in the record's toy rows, name in the frontier)]
TOY_MODELS: dict[str, list[tuple[str, str]]] = {
    "foundations": [("euler", "flow teacher, Euler")],
    "rectified_flow": [("2-RF", "2-RF"), ("3-RF", "3-RF")],
    "consistency": [("CT", "CT"), ("CD", "CD (consistency distillation)")],
    "score_distillation": [
        ("Diff-Instruct (w = 1)", "Diff-Instruct"),
        ("VSD, online fake score", "VSD"),
        ("DMD (normalised)", "DMD (gradient only)"),
        ("f-distill, reverse KL", "f-distill, reverse KL"),
        ("f-distill, forward KL", "f-distill, forward KL"),
        ("f-distill, Jensen-Shannon", "f-distill, Jensen-Shannon"),
    ],
    "dmd2": [
        ("lagging fake: DMD (1:1 + regression)", "DMD (+ regression), lagging fake score"),
        ("lagging fake: DMD2 (5:1 + GAN)", "DMD2, lagging fake score"),
    ],
}

QUALITY = ("accuracy", "proxy_fd", "within_class_std", "fid")


def _is(key: str, names) -> bool:
    """Whether column ``key`` is one of ``names`` or the seed spread (``_std``) of one."""
    return key in names or (key.endswith("_std") and key[: -len("_std")] in names)


def load_records(root: str | Path | None = None) -> list[dict]:
    """Every chapter record under ``root``, each with its ``path`` relative to it (benchmark
    measurements and the frontier's own records are not read).

    By default: the records committed with the book (``results/`` of the checkout) and those
    of the current results folder (``$OSD_RESULTS_DIR``, where a run such as the ``gpu``
    chain writes), the latter winning where both have the same file."""
    if root is not None:
        roots = [Path(root)]
    else:
        committed = repo_root()
        roots = [committed / "results"] if committed else []
        roots += [] if results_dir() in roots else [results_dir()]
    found: dict[str, dict] = {}
    for folder in roots:  # results.read_records leaves out benchmarks/ and frontier/
        for record in read_records(folder):
            found[record.pop("_path")] = record

    def key(path: str) -> tuple:  # chapter order, then profile/device, then seed
        run = path.split("-seed")[0] if found[path].get("seed") else path.removesuffix(".json")
        return (chapter_rank(path.split("/")[0]), run, found[path].get("seed") or 0)

    order = sorted(found, key=key)
    return [{**found[k], "path": k} for k in order]


def provenance(record: dict) -> dict:
    """Where a number comes from: the record's file, commit, profile, device and seed."""
    return {
        "chapter": record["chapter"],
        "ch": f"{chapter_rank(record['chapter']):02d}" if record["chapter"] in CHAPTERS else "",
        "record": record["path"],
        "seed": record.get("seed") or 0,
        "commit": str(record.get("commit", "unknown"))[:7],
        "profile": record["profile"],
        "device": record["device"],
        "dataset": record.get("dataset", ""),
    }


def _matches(row: dict, key: str, chapter: str) -> bool:
    if chapter == "foundations":  # the teacher's rows are keyed by solver
        return row.get("solver") == key
    return row.get("model") == key


def _cost(record: dict, key: str) -> dict[str, Any]:
    """Training cost of the stage that made model ``key`` (None where the record has none)."""
    m, s = record["metrics"], record.get("settings", {})
    chapter = record["chapter"]
    steps = wall = batch = updates = None
    if chapter == "foundations":
        steps, wall, batch = (
            m.get("teacher_steps"),
            m.get("teacher_train_wall_s"),
            s.get("image_batch"),
        )
    elif chapter == "distilled_decoding":
        if key.startswith("DD student"):
            steps, wall, batch = (
                m.get("student_steps"),
                m.get("train_wall_s", {}).get("student"),
                s.get("student_batch"),
            )
        elif key.startswith("AR teacher"):
            steps, wall, batch = (
                m.get("ar_steps"),
                m.get("train_wall_s", {}).get("ar"),
                s.get("ar_batch"),
            )
    else:
        steps = m.get("train_steps", {}).get(key)
        wall = m.get("train_wall_s", {}).get(key)
        batch = s.get("batch")
    for r in m.get("image", []):
        if r.get("model") == key and r.get("generator_updates") is not None:
            updates = r["generator_updates"]
    if updates is None:
        updates = steps
    return {
        "train_steps": steps,
        "generator_updates": updates,
        "images_seen": steps * batch if steps is not None and batch else None,
        "train_wall_s": wall,
    }


def pool_seeds(rows: list[dict], columns) -> list[dict]:
    """The rows of one run at several seeds (records of the same chapter, profile and device,
    written by ``make seeds``) made one row per model and NFE: each of ``columns`` becomes the
    mean over every seed with ``<column>_std`` and ``seeds`` (a row that is already a mean over
    seeds of its own counts each of them; :func:`osdlib.metrics.pooled`). The rest of the row
    (cost, provenance) is the lowest seed's, and ``seed_records`` lists every record pooled."""
    from .metrics import pool_columns

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["chapter"], r["profile"], r["device"], r["model"], r["nfe"])
        groups.setdefault(key, []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r.get("seed") or 0)
        row = dict(rs[0])
        if len(rs) > 1:
            row |= pool_columns(rs, columns) | {"seed_records": [r["record"] for r in rs]}
        out.append(row)
    return out


def image_rows(records: list[dict]) -> list[dict]:
    """The frontier's image rows, in chapter order, each with its provenance and cost; the
    records of one run at several seeds give one row of means and spreads (:func:`pool_seeds`)."""
    out = []
    for record in records:
        chapter = record["chapter"]
        source = record["metrics"].get("rows" if chapter == "distilled_decoding" else "image", [])
        for key, name, family in IMAGE_MODELS.get(chapter, []):
            for r in source:
                if not _matches(r, key, chapter) or r.get("nfe") is None:
                    continue
                quality = {k: v for k, v in r.items() if _is(k, QUALITY) or k == "seeds"}
                if r.get("ms_per_image") is not None:
                    quality["recorded_ms_per_image"] = r["ms_per_image"]
                elif r.get("seconds_per_image") is not None:
                    quality["recorded_ms_per_image"] = 1000 * r["seconds_per_image"]
                elif r.get("images_per_s"):
                    quality["recorded_ms_per_image"] = 1000 / r["images_per_s"]
                out.append(
                    {"model": name, "family": family, "nfe": r["nfe"]}
                    | quality
                    | _cost(record, key)
                    | {"params": _params(record, key)}
                    | provenance(record)
                )
    return pool_seeds(out, QUALITY)


def _params(record: dict, key: str) -> int | None:
    params = record.get("params") or {}
    if record["chapter"] == "foundations":
        return params.get("image_teacher")
    if record["chapter"] == "distilled_decoding":
        return params.get("student" if key.startswith("DD student") else "teacher")
    return params.get(key) or params.get(key.split(" (")[0])


def toy_rows(records: list[dict], max_nfe: int = 2) -> list[dict]:
    """The 2-D rows (8 Gaussians) up to ``max_nfe``: SWD and modes hit, with the record each
    comes from (chapter 00's teacher also at its largest NFE, the reference); pooled over the
    records of one run at several seeds like :func:`image_rows`."""
    out = []
    for record in records:
        toy = record["metrics"].get("toy", [])
        if isinstance(toy, dict):  # chapter 00: {solver: rows}
            toy = [{"model": solver, **r} for solver, rs in toy.items() for r in rs]
        for key, name in TOY_MODELS.get(record["chapter"], []):
            rows = [r for r in toy if r.get("model") == key]
            top = max((r.get("nfe", 1) for r in rows), default=1)
            for r in rows:
                nfe = r.get("nfe", 1)
                if nfe > max_nfe and not (record["chapter"] == "foundations" and nfe == top):
                    continue
                row = {"model": name, "nfe": nfe}
                row |= {k: v for k, v in r.items() if _is(k, ("swd", "modes")) or k == "seeds"}
                out.append(row | provenance(record))
    return pool_seeds(out, ("swd", "modes"))


def reno_rows(records: list[dict]) -> list[dict]:
    """ReNO on the one-step generators (chapter 05): mean and spread over its seeds of the
    optimised reward and the held-out judge, for each variant at equal forward passes."""
    out = []
    for record in records:
        if record["chapter"] != "reno":
            continue
        seeds = next((r["seeds"] for r in record.get("rows", []) if "seeds" in r), None)
        for r in record["metrics"].get("summary", []):
            row = {"generator": r["generator"], "variant": r["variant"], "seeds": seeds}
            for k in ("reward", "judge_accuracy", "judge_logp"):
                if k in r:
                    row[k], row[f"{k}_std"] = r[k]
            out.append(row | provenance(record))
    return out


def record_summary(records: list[dict]) -> list[dict]:
    """One line per record: chapter, profile, device, commit, wall time, data set."""
    return [
        provenance(r) | {"wall_s": r.get("wall_s"), "created": r.get("created", "")}
        for r in records
    ]


FAMILY_COLOR = {
    "rectified flow": "C0",
    "consistency": "C1",
    "score distillation": "C2",
    "autoregressive": "C3",
}
MARKERS = "os^DvP*Xh<>"
CURVES = ("flow teacher, Euler", "2-RF (reflow)")  # flows sampled at many NFE: drawn as lines
TEACHERS = ("flow teacher, Euler", "AR teacher (token by token)")  # the rest are generators


def quality_metric(rows: list[dict]) -> tuple[str, str]:
    """The quality measure to plot a run's rows by, and its axis label: FID where a generator
    other than the teachers has one (a run whose chain skipped the students' FIDs would
    otherwise show the teacher alone), else proxy-FD."""
    from .metrics import PROXY_NAME

    if any(r.get("fid") is not None for r in rows if r["model"] not in TEACHERS):
        return "fid", "FID (standard, see the chapter's record)"
    return "proxy_fd", PROXY_NAME


def plot(rows: list[dict], key: str, label: str):
    """Quality ``key`` of every image generator against NFE (left) and against ms per image
    (right), log-log: the teacher and 2-RF as lines over their NFE, every other model as
    points, coloured by family. A row without ``key`` (e.g. a row whose FID was not
    computed) or without the x value is left out of that panel, and a model with no point
    left out of the legend."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0))
    models = list(dict.fromkeys(r["model"] for r in rows if r["model"] not in CURVES))
    count: dict[str, int] = {}
    style = {}
    for m in models:
        fam = next(r["family"] for r in rows if r["model"] == m)
        style[m] = (FAMILY_COLOR.get(fam, "k"), MARKERS[count.get(fam, 0) % len(MARKERS)])
        count[fam] = count.get(fam, 0) + 1

    def points(model: str, xkey: str) -> list[dict]:
        pts = [
            r
            for r in rows
            if r["model"] == model and r.get(xkey) is not None and r.get(key) is not None
        ]
        return sorted(pts, key=lambda r: r[xkey])

    for ax, xkey, xlabel in zip(
        axes, ("nfe", "ms_per_image"), ("NFE (network calls per image)", "ms per image")
    ):
        for name, c in zip(CURVES, ("0.45", "C0")):
            curve = points(name, xkey)
            if not curve:  # nothing to draw: no line, and no entry in the legend
                continue
            ax.plot(
                [r[xkey] for r in curve],
                [r[key] for r in curve],
                "-",
                c=c,
                lw=1.2,
                marker=".",
                label=name + " (line)",
            )
        for m in models:
            pts = points(m, xkey)
            if not pts:
                continue
            c, mk = style[m]
            ax.scatter(
                [r[xkey] for r in pts],
                [r[key] for r in pts],
                c=c,
                marker=mk,
                s=42,
                zorder=3,
                label=m,
                edgecolors="k",
                linewidths=0.4,
            )
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=4,
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, -0.22),
    )
    return fig
